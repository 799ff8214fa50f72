"""Optimizer state against parameter bytes at the paper's shape, from shapes alone.

Uses ``Trainer.abstract_state`` (``jax.eval_shape``): nothing is allocated, so a ~15B-parameter
configuration is counted on a laptop in seconds.
"""

from __future__ import annotations

import logging
from typing import Any

PAPER_GIN = "gin/runs/paper_usm_mt0xxl.gin"


def optimizer_share(gin_file: str = PAPER_GIN, optimizers: tuple[str, ...] = ("adamw", "adafactor")) -> dict[str, Any]:
    """{optimizer: bytes of its state, and that as a share of all parameter bytes}."""
    import flax.linen as nn
    import gin
    import jax

    from slm_jax.parallel import partitioning
    from slm_jax.cli import common as cli_common
    from slm_jax.models.spec import sample_batch
    from slm_jax.training.optimizers import make_optimizer
    from slm_jax.training.step import Trainer, tree_bytes

    # gin logs an ERROR for each include it first looks up relative to the cwd and then finds on
    # the search path: noise in a benchmark's output, not a failure.
    logging.disable(logging.ERROR)
    try:
        cli_common.parse_gin([gin_file], [])
    finally:
        logging.disable(logging.NOTSET)
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    slm = model.build()
    example = sample_batch(1, {"audio_frames": 64, "prefix": 2, "suffix": 2, "targets": 2})
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    try:
        configured = gin.query_parameter("train.optimizer")
    except ValueError:  # not bound: the train loop's default
        configured = "adamw"
    out: dict[str, Any] = {"gin_file": gin_file, "configured_optimizer": configured}
    for name in optimizers:
        optimizer, schedule = make_optimizer(name=name)
        trainer = Trainer(slm, optimizer, schedule, mesh)
        params = nn.unbox(trainer.abstract_variables(example)["params"])
        param_bytes = tree_bytes(params)
        state = trainer.abstract_state(example)
        opt_bytes = tree_bytes(state.opt_state)
        out[name] = {"optimizer_state_bytes": opt_bytes, "param_bytes": param_bytes,
                     "adapter_param_bytes": tree_bytes(params["adapter"]),
                     "share_of_param_bytes": opt_bytes / param_bytes}
    return out
