"""The shipped release adapter (release/whisper_base_smollm2) still fits the default config.

Cheap: reads the checkpoint metadata and compares it with the adapter shapes of
gin/whisper_base_smollm2.gin (eval_shape only; no weights are loaded). A change to the default
adapter that would make `slm-infer --checkpoint=release/...` fail is caught here.
"""

from __future__ import annotations

import pathlib

import pytest

RELEASE = pathlib.Path(__file__).resolve().parents[1] / "release" / "whisper_base_smollm2"

pytestmark = pytest.mark.skipif(not RELEASE.is_dir(), reason="no release checkpoint in this checkout")


def test_release_fits_the_default_config():
    import gin
    import jax

    from slm_jax import checkpointing, partitioning
    from slm_jax.cli import common
    from slm_jax.experiment import sample_batch
    from slm_jax.trainer import Trainer, make_optimizer

    gin.clear_config()
    common.parse_gin(["whisper_base_smollm2.gin"], [])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    data = gin.query_parameter("train.data").scoped_configurable_fn()
    directory, step = checkpointing.find_checkpoint_dir(str(RELEASE))
    metadata = checkpointing.read_metadata(directory, step)
    optimizer, schedule = make_optimizer()
    trainer = Trainer(model.build(), optimizer, schedule, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    abstract = trainer.abstract_state(sample_batch(1, data.feature_lengths))
    checkpointing.check_compatible(
        metadata, checkpointing.describe_state(abstract.adapter_params, model.frozen_sources), directory)
    assert metadata["release"]["adapter_dtype"] == "float16"
    assert metadata["release"]["optimizer_state"] == "zeros"
    gin.clear_config()
