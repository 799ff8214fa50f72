"""Paper-scale shapes, counted with jax.eval_shape: nothing is allocated."""

import os

import gin
import jax
import pytest

from slm_jax.cli import common
from slm_jax.trainer import Trainer, count_params, make_optimizer, tree_bytes
from slm_jax.experiment import sample_batch
from slm_jax import partitioning

LENGTHS = {"audio_frames": 3000, "prefix": 16, "suffix": 16, "targets": 128}


def _counts(gin_file: str, optimizer: str = "adamw") -> dict[str, int]:
    gin.clear_config()
    common.parse_gin([gin_file], [])
    spec = gin.query_parameter("train.model").scoped_configurable_fn()
    gin.clear_config()
    optimizer, _ = make_optimizer(name=optimizer)
    trainer = Trainer(spec.build(), optimizer, None, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    example = sample_batch(2, LENGTHS)
    params = trainer.abstract_variables(example)["params"]
    counts = {k: count_params(v) for k, v in params.items()}
    state = trainer.abstract_state(example)
    counts["optimizer_state"] = count_params(state.opt_state)
    counts["optimizer_bytes"] = tree_bytes(state.opt_state)
    counts["param_bytes"] = tree_bytes(params)
    return counts


def test_paper_scale_usm_mt0xxl_parameter_counts():
    c = _counts("paper_usm_mt0xxl.gin")
    assert 1.9e9 < c["speech_encoder"] < 2.3e9  # USM: ~2B Conformer
    assert 12.5e9 < c["llm"] < 13.3e9  # mT0-XXL: ~13B
    assert c["adapter"] == pytest.approx(156e6, rel=0.03)  # the paper's 156M adapter
    total = c["speech_encoder"] + c["llm"] + c["adapter"]
    assert 0.008 < c["adapter"] / total < 0.012  # ~1% of all parameters
    # AdamW: two moments of the adapter only (nothing for the frozen 15B).
    assert c["optimizer_state"] == pytest.approx(2 * c["adapter"], abs=16)
    # Adafactor (the paper config's optimizer, as in T5X): under 2% of all parameter bytes.
    c = _counts("paper_usm_mt0xxl.gin", optimizer="adafactor")
    assert c["optimizer_bytes"] / c["param_bytes"] < 0.02
