"""Where a model's parameters live: their abstract shapes, logical names and shardings on a mesh.

Training (slm_jax/training/step.py), inference, planning and the frozen-weight loaders all need
this, and none of it is about training: a ``ModelPlacement`` holds it for one model and mesh.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from slm_jax.parallel import partitioning

Batch = Mapping[str, Any]


def batch_shapes(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape-only view of a batch. Parameter shapes never depend on batch size, so one row is
    enough, which keeps planning a paper-scale batch free of host allocations."""
    return {k: jax.ShapeDtypeStruct((1,) + tuple(v.shape[1:]), v.dtype) for k, v in batch.items()}


def zeros_like_batch(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_shapes(batch).items()}


class ModelPlacement:
    """The abstract parameters of one SLM and their shardings on ``mesh`` under ``rules``."""

    def __init__(self, model: nn.Module, mesh: Mesh, rules=partitioning.DEFAULT_RULES):
        self.model = model
        self.mesh = mesh
        self.rules = tuple(rules)
        self._abstract_variables: dict[tuple, Any] = {}

    def abstract_variables(self, sample_batch: Batch) -> Any:
        """Boxed (logically named) abstract parameters of the whole SLM; nothing is allocated.

        Cached per batch signature: tracing a paper-scale model takes seconds, and shardings,
        restore targets and planning all ask for it.
        """
        shapes = batch_shapes(sample_batch)
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in shapes.items()))
        if key not in self._abstract_variables:
            self._abstract_variables[key] = jax.eval_shape(lambda b: self.model.init(jax.random.key(0), b), shapes)
        return self._abstract_variables[key]

    def param_shardings(self, sample_batch: Batch) -> Any:
        with nn.logical_axis_rules(self.rules):
            return partitioning.shardings_for_tree(self.abstract_variables(sample_batch)["params"], self.mesh, self.rules)

    def abstract_params(self, name: str, sample_batch: Batch) -> Any:
        """ShapeDtypeStructs with shardings of one part ('speech_encoder', 'adapter', 'llm')."""
        abstract = nn.unbox(self.abstract_variables(sample_batch)["params"])[name]
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.param_shardings(sample_batch)[name])

    def init_frozen_randomly(self, name: str, seed: int, sample_batch: Batch) -> Any:
        """Random weights for one frozen part (tiny configs and tests), created in place sharded."""
        shardings = self.param_shardings(sample_batch)[name]

        def init(batch):
            return nn.unbox(self.model.init(jax.random.key(seed), batch))["params"][name]

        return jax.jit(init, out_shardings=shardings)(zeros_like_batch(sample_batch))
