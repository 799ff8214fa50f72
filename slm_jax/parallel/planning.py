"""Per-device memory planning before launch: parameters, optimizer state and activations.

Parameter and optimizer bytes come from ``jax.eval_shape`` and the sharding rules (nothing is
allocated); activation/workspace bytes from compiling the real train step for the mesh (on fake
host devices when planning for a pod from a laptop) and reading XLA's memory analysis.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import flax.linen as nn
import jax

from slm_jax.parallel import partitioning
from slm_jax.models.spec import ModelSpec, sample_batch
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer

# Named mesh shapes: chips of a slice (a v4 chip is one JAX device).
MESH_PRESETS = {
    "v4-64": dict(data=2, fsdp=16, model=1),  # 32 chips
    "v5p-128": dict(data=4, fsdp=16, model=1),  # 64 chips
    "v5e-256": dict(data=16, fsdp=16, model=1),  # 256 chips
    "8xh100": dict(data=1, fsdp=8, model=1),
    "8xh100-tp": dict(data=1, fsdp=4, model=2),
}


class PlanningError(ValueError):
    """A mesh that cannot be planned here (e.g. more devices than this process has)."""


def mesh_from_spec(spec: str) -> dict[str, int]:
    """A preset name or 'data=D,fsdp=F,model=M' -> {axis: size}; every size must be at least 1."""
    if spec in MESH_PRESETS:
        return dict(MESH_PRESETS[spec])
    shape = partitioning.parse_mesh_spec(spec)
    if not shape:
        raise PlanningError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,fsdp=1,model=4'")
    for axis, size in shape.items():
        if size < 1:
            raise PlanningError(f"mesh {spec!r}: axis {axis} has size {size}; every axis needs at least 1 device")
    return shape


def check_batch(mesh_shape: Mapping[str, int], batch_size: int) -> None:
    """The global batch is split over the data and fsdp axes: it must divide evenly."""
    if batch_size < 1:
        raise PlanningError(f"the batch size must be at least 1, got {batch_size}")
    shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if batch_size % shards:
        mesh = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
        raise PlanningError(f"batch {batch_size} does not divide over the {shards} batch shards of mesh {mesh} "
                            f"(data x fsdp); use a multiple of {shards}")


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    devices: int
    frozen_param_bytes: int  # per device
    adapter_param_bytes: int
    optimizer_bytes: int
    frozen_params: int  # totals (counts)
    adapter_params: int
    compiled: dict[str, int] | None  # XLA memory analysis of the train step, per device
    compile_seconds: float | None

    @property
    def total_bytes(self) -> int:
        if self.compiled:
            c = self.compiled
            return c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
        return self.frozen_param_bytes + 2 * (self.adapter_param_bytes + self.optimizer_bytes)


def _per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan(
    model: ModelSpec, mesh_shape: Mapping[str, int], batch_size: int, feature_lengths: Mapping[str, int],
    compile_step: bool = True,
) -> MemoryPlan:
    n = math.prod(mesh_shape.values())
    if n > len(jax.devices()):
        raise PlanningError(
            f"mesh {dict(mesh_shape)} needs {n} devices; this process has {len(jax.devices())} "
            "(fake CPU devices are fixed when JAX starts: run slm-plan in a fresh process)"
        )
    mesh = partitioning.make_mesh(devices=jax.devices()[:n], **mesh_shape)
    optimizer, schedule = make_optimizer()
    trainer = Trainer(model.build(), optimizer, schedule, mesh)
    example = sample_batch(batch_size, feature_lengths)
    abstract = nn.unbox(trainer.abstract_variables(example)["params"])
    shardings = trainer.param_shardings(example)
    frozen_abstract = {k: abstract[k] for k in ("speech_encoder", "llm")}
    frozen_shardings = {k: shardings[k] for k in ("speech_encoder", "llm")}
    state = trainer.abstract_state(example)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    compiled = seconds = None
    if compile_step:
        start = time.time()
        analysis = trainer.lower_train_step(example).compile().memory_analysis()
        seconds = time.time() - start
        compiled = {
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
            "alias_bytes": int(analysis.alias_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes),
        }
    return MemoryPlan(
        mesh=dict(mesh_shape), devices=n,
        frozen_param_bytes=_per_device_bytes(frozen_abstract, frozen_shardings),
        adapter_param_bytes=_per_device_bytes(state.adapter_params, state_shardings.adapter_params),
        optimizer_bytes=_per_device_bytes(state.opt_state, state_shardings.opt_state),
        frozen_params=count(frozen_abstract), adapter_params=count(state.adapter_params),
        compiled=compiled, compile_seconds=seconds,
    )


def format_plans(plans: list[MemoryPlan], device_memory_gib: float | None = None) -> str:
    gib = lambda b: f"{b / 2**30:9.2f}"  # noqa: E731
    header = (f"{'mesh':<28} {'devices':>7} {'frozen GiB':>10} {'adapter GiB':>11} {'optim GiB':>9} "
              f"{'activ/temp GiB':>14} {'total GiB':>9}")
    lines = [header, "-" * len(header)]
    for p in plans:
        mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
        temp = gib(p.compiled["temp_bytes"]) if p.compiled else "  (no compile)"
        fits = ""
        if device_memory_gib:
            within = p.total_bytes <= device_memory_gib * 2**30
            if p.compiled:
                fits = "  fits" if within else "  DOES NOT FIT"
            else:  # no compiled step: activations and workspace are unknown
                fits = ("  parameters and optimizer state fit; activations not counted" if within
                        else "  DOES NOT FIT (parameters and optimizer state alone)")
        lines.append(f"{mesh:<28} {p.devices:>7} {gib(p.frozen_param_bytes):>10} {gib(p.adapter_param_bytes):>11} "
                     f"{gib(p.optimizer_bytes):>9} {temp:>14} {gib(p.total_bytes):>9}{fits}")
    p = plans[0]
    lines.append(f"parameters: frozen {p.frozen_params:,}, adapter {p.adapter_params:,} "
                 f"({100 * p.adapter_params / (p.adapter_params + p.frozen_params):.2f}% of all)")
    return "\n".join(lines)
