"""Logical-axis partitioning: the one place that maps model axis names onto the device mesh.

Every parameter in slm-jax is created with logical axis names (``embed``, ``mlp``, ``heads``,
...). A rule table maps each logical name to zero or more mesh axes. Changing how a model is
sharded (data parallel, FSDP, tensor parallel) means changing the rules or the mesh shape, never
the model code. This is the T5X/MaxText recipe, written directly on ``jax.sharding``.

Mesh axes:
  data  - pure data parallelism (batch split, parameters replicated)
  fsdp  - batch split AND parameters/optimizer state split (ZeRO-3 style)
  model - tensor parallelism (heads / mlp / vocab split)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# (logical axis, mesh axes). First matching rule wins; a logical axis not listed is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    # Axes that stay replicated: sequence lengths, head_dim, conv kernels, position buckets.
    ("length", None),
    ("kv", None),
    ("conv_kernel", None),
    ("relpos_buckets", None),
    ("mel", None),
    ("layers", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a ('data', 'fsdp', 'model') mesh; ``-1`` for data takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % (fsdp * model):
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x model={model}")
        data = n // (fsdp * model)
    if data * fsdp * model != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x model={model} = {data * fsdp * model} "
            f"does not match the {n} available devices"
        )
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp, model)
    return Mesh(grid, MESH_AXES)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4} (used by CLIs and gin)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,fsdp=1,model=4'")
        size = int(value)
        if size < 1 and not (name == "data" and size == -1):
            raise ValueError(f"bad mesh spec {spec!r}: axis {name} has size {size} (sizes are >= 1; data=-1 "
                             "takes the remaining devices)")
        out[name] = size
    return out


def _mesh_axes_for(logical: str | None, rules: Iterable[tuple[str, Any]]) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, mesh_axes in rules:
        if name == logical:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Iterable[tuple[str, Any]] = DEFAULT_RULES,
) -> PartitionSpec:
    """Resolves logical names to a PartitionSpec for an array of ``shape`` on ``mesh``.

    A mesh axis is used at most once per array, and a dimension that the mesh axes do not divide
    evenly is replicated instead (e.g. 3 key/value heads on a 4-way model axis): sharding then
    degrades gracefully rather than failing at compile time.
    """
    rules = tuple(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = [a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1]
        # Drop trailing mesh axes until the product divides the dimension.
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_axes_tree(abstract_variables: Any) -> Any:
    """The logical axis names of every leaf of an (abstract) linen variable tree."""
    return nn.get_partition_spec(abstract_variables)


def shardings_for_tree(
    abstract_variables: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for a tree of ``nn.LogicallyPartitioned`` (or plain) abstract leaves.

    The result has the structure of ``nn.unbox(abstract_variables)``. Plain leaves (no
    logical names) are replicated.
    """
    rules = tuple(rules)

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            spec = logical_to_mesh_spec(leaf.names, value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding for a batch array: leading dimension over the batch mesh axes."""
    axes = tuple(a for a in _mesh_axes_for("batch", tuple(rules)) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    sharding = batch_sharding(mesh, rules)
    return {k: sharding for k in batch}


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint; a no-op outside a mesh/rules context (CPU tests, eager use)."""
    return nn.with_logical_constraint(x, tuple(logical_axes))
