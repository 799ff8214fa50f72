"""Low-rank adapters (LoRA) on the dense kernels of a frozen Flax parameter tree.

A kernel W [in..., out...] is used as W + scale * (A @ B) reshaped to W's shape, with A [in, r]
and B [r, out]; B starts at zero, so an untrained adapter leaves the model exactly as it was.
The frozen tree is never changed: ``merge`` returns a new tree, and only the factors train and
are saved (``save``/``load``: one .npz with the rank, the scale, the factors and nothing else).

Used for Whisper's decoder in the transcriber front end (slm_jax/contrib/whisper_cascade/tuning.py says why).
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.weights.assets import atomic_output

Factors = dict[str, dict[str, Any]]  # "layers_0/self_attn/query" -> {"a": [in, r], "b": [r, out]}
FORMAT = "slm-jax-lora/1"


class LoraError(ValueError):
    """A LoRA file is missing or malformed, or its factors do not fit the model's kernels."""


def _kernel(params: Mapping[str, Any], path: str) -> Any:
    node = params
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise LoraError(f"LoRA target {path!r}: the model has no {key!r} there")
        node = node[key]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise LoraError(f"LoRA target {path!r} is not a dense layer with a kernel")
    return node["kernel"]


def _split(shape: Sequence[int], fan_in: int, path: str) -> int:
    """How many leading axes of a kernel of ``shape`` are its inputs, given their product."""
    for i in range(1, len(shape)):
        if math.prod(shape[:i]) == fan_in:
            return i
    raise LoraError(f"LoRA factor A of {path!r} has {fan_in} rows; no leading axes of the kernel {tuple(shape)} "
                    f"multiply to that")


def target_paths(params: Mapping[str, Any], layer_prefix: str, modules: Sequence[str]) -> list[str]:
    """Every ``<layer>/<module>`` with a kernel, for the top-level keys starting with ``layer_prefix``
    (e.g. 'layers_' and ('self_attn/query', 'mlp/wi'))."""
    layers = sorted((k for k in params if k.startswith(layer_prefix)), key=lambda k: (len(k), k))
    if not layers:
        raise LoraError(f"no parameter group starts with {layer_prefix!r}; have {sorted(params)}")
    paths = [f"{layer}/{module}" for layer in layers for module in modules]
    for path in paths:
        _kernel(params, path)
    return paths


def input_axes(path: str) -> int:
    """How many leading kernel axes are inputs: 2 for an attention output projection
    (heads, head_dim, out), 1 for everything else here (query/key/value (in, heads, head_dim), MLPs)."""
    return 2 if path.rsplit("/", 1)[-1] == "out" else 1


def init(params: Mapping[str, Any], paths: Sequence[str], rank: int, key: jax.Array) -> Factors:
    """Factors for ``paths``: A ~ N(0, 1/fan_in), B = 0 (the merged model starts as the frozen one)."""
    if rank < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {rank}")
    factors = {}
    for i, path in enumerate(paths):
        kernel = _kernel(params, path)
        fan_in = math.prod(kernel.shape[:input_axes(path)])
        fan_out = math.prod(kernel.shape) // fan_in
        a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / np.sqrt(fan_in)
        factors[path] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
    return factors


def merge(params: Mapping[str, Any], factors: Factors, scale: float) -> dict[str, Any]:
    """A copy of ``params`` whose target kernels carry ``scale * A @ B`` (differentiable in the factors)."""
    out = dict(params)  # new containers along each target's path below; the leaves are shared
    for path, ab in factors.items():
        kernel = _kernel(params, path)
        a, b = ab["a"], ab["b"]
        _split(kernel.shape, a.shape[0], path)
        if a.shape[1] != b.shape[0] or a.shape[0] * b.shape[1] != math.prod(kernel.shape):
            raise LoraError(f"LoRA factors of {path!r} are {tuple(a.shape)} and {tuple(b.shape)}; they do not "
                            f"make the kernel {tuple(kernel.shape)}")
        delta = (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)) * scale
        node = out
        keys = path.split("/")
        for key in keys[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[keys[-1]] = dict(node[keys[-1]], kernel=(kernel + delta.reshape(kernel.shape)).astype(kernel.dtype))
    return out


def save(path: str | os.PathLike, factors: Factors, scale: float, metadata: Mapping[str, str] | None = None) -> str:
    """Writes the factors to ``path`` (.npz) atomically; returns its SHA-256."""
    arrays = {f"{name}|{x}": np.asarray(ab[x], np.float32) for name, ab in factors.items() for x in ("a", "b")}
    meta = {"format": FORMAT, **(metadata or {})}
    with atomic_output(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:  # an open file: np.savez would add .npz to a path
            np.savez(f, __scale__=np.float32(scale), __meta__=np.array(sorted(meta.items()), dtype=str), **arrays)
    return file_sha256(path)


def load(path: str | os.PathLike) -> tuple[Factors, float, dict[str, str]]:
    """(factors, scale, metadata) from a file written by ``save``."""
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = dict(z["__meta__"].tolist())
            scale = float(z["__scale__"])
            factors: Factors = {}
            for key in z.files:
                if key.startswith("__"):
                    continue
                name, _, x = key.rpartition("|")
                factors.setdefault(name, {})[x] = np.asarray(z[key])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise LoraError(f"LoRA file {str(path)!r} is not a readable slm-jax LoRA file: {e}") from None
    if meta.get("format") != FORMAT:
        raise LoraError(f"LoRA file {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    incomplete = sorted(name for name, ab in factors.items() if set(ab) != {"a", "b"})
    if incomplete:
        raise LoraError(f"LoRA file {str(path)!r} lacks a factor for {incomplete[0]!r}")
    return factors, scale, meta


def file_sha256(path: str | os.PathLike) -> str:
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
