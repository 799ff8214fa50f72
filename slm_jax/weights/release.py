"""A small release checkpoint of a trained adapter, readable by ``slm-infer --checkpoint=``.

A training checkpoint holds the adapter parameters and AdamW's two moment trees, all float32:
three times the adapter. A release keeps the same Orbax layout and metadata (so
``inference.load_trained`` reads it unchanged) but stores the parameters as float16 and the
optimizer state as zeros, which compress to almost nothing: about a sixth of the training
checkpoint. Restoring casts back to the float32 the model is built with; the float16 rounding
(relative 5e-4) changes answers very rarely. Resuming *training* from a release starts the
optimizer moments from zero.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RELEASE_DTYPE = np.float16


def _restore_training_state(checkpoint: str, model: Any, data: Any):
    from slm_jax.training import checkpointing
    from slm_jax.parallel import partitioning
    from slm_jax.models.spec import sample_batch
    from slm_jax.inference.model import _optimizer_name
    from slm_jax.training.optimizers import make_optimizer
    from slm_jax.training.step import Trainer

    optimizer, schedule = make_optimizer(name=_optimizer_name())
    trainer = Trainer(model.build(), optimizer, schedule, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    abstract = trainer.abstract_state(sample_batch(1, data.feature_lengths))
    return checkpointing.restore_checkpoint(checkpoint, abstract, model.frozen_sources, model.speech_front_end)


def export_release(checkpoint: str, dest: str, model: Any, data: Any, note: str = "") -> str:
    """Writes ``dest/<step>`` from the training checkpoint ``checkpoint``; returns ``dest``.

    ``dest`` must not hold a checkpoint already (a release is written once)."""
    from slm_jax.training import checkpointing

    if os.path.isdir(dest) and os.listdir(dest):
        raise checkpointing.CheckpointError(f"{dest} is not empty; a release is written into a new directory")
    state, position, metadata, step, directory = _restore_training_state(checkpoint, model, data)
    small = state.replace(
        adapter_params=jax.tree.map(lambda x: jnp.asarray(x, RELEASE_DTYPE), state.adapter_params),
        opt_state=jax.tree.map(jnp.zeros_like, state.opt_state),
    )
    out = checkpointing.Checkpointer(dest, max_to_keep=1)
    out.save(step, small, position, {**metadata, "release": {
        "exported_from": os.path.abspath(directory), "step": step, "adapter_dtype": np.dtype(RELEASE_DTYPE).name,
        "optimizer_state": "zeros", "note": note}})
    out.close()
    return dest


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


DESCRIPTION = """\
Export a trained adapter as a small release checkpoint (float16 parameters, zeroed optimizer
state, same Orbax layout), readable by slm-infer/slm-eval --checkpoint=DEST.

example:
  python -m slm_jax.weights.release --gin_file=gin/runs/whisper_base_smollm2.gin --checkpoint=runs/release/train \\
      --out=release/whisper_base_smollm2
"""


def main(argv=None) -> int:
    import sys

    from slm_jax.cli import common

    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("slm-release", DESCRIPTION)
        parser.add_argument("--checkpoint", required=True, help="a training run directory or one step directory")
        parser.add_argument("--out", required=True, help="a new, empty directory for the release")
        parser.add_argument("--note", default="", help="free text stored in the release metadata")
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give the --gin_file the adapter was trained with")
        common.setup_logging()
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        import gin

        model = gin.query_parameter("train.model").scoped_configurable_fn()
        data = gin.query_parameter("train.data").scoped_configurable_fn()
        export_release(args.checkpoint, args.out, model, data, note=args.note)
        print(f"{args.out}: {directory_bytes(args.out) / 2**20:.1f} MiB")
        return 0

    return common.run_main("slm-release", run)


if __name__ == "__main__":
    raise SystemExit(main())
