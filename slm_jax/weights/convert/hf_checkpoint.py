"""Reading Hugging Face checkpoints lazily and mapping their tensors onto linen parameter trees.

Shared by the Llama-family and T5-family converters (and usable by any other):

- ``HFCheckpoint`` opens a checkpoint directory (config.json + model.safetensors, or a sharded
  model.safetensors.index.json) and reads one tensor at a time, so converting a 13B model never
  holds a second full copy on the host.
- A converter describes its model as a list of ``TensorRule`` (HF name, expected HF shape,
  transform, our parameter path); ``apply_rules`` checks every tensor is present with the right
  shape, that the checkpoint holds no tensor the architecture has no place for, and builds the
  nested params dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from slm_jax.weights.convert.errors import ConversionError

GetTensor = Callable[[str], np.ndarray]
# Called once per converted tensor with (our parameter path, the array); what it returns goes into
# the tree. The default keeps the numpy array; ``slm_jax.weights.frozen`` puts it straight onto the
# devices in its sharding so the host never holds more than one converted tensor.
Place = Callable[[tuple, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor and where it goes: ``params[path] = transform(tensor)``."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x


# --- torch Linear weight [out, in] -> DenseGeneral kernel [in..., out...] ------------------------

def linear_to_kernel(in_shape: Sequence[int], out_shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """[out, in] -> kernel [*in_shape, *out_shape] (e.g. [d, heads, head_dim] for a query)."""

    def transform(w: np.ndarray) -> np.ndarray:
        return w.T.reshape(*in_shape, *out_shape)

    return transform


def reshape_to(shape: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.reshape(*shape)


# --- the generic conversion -------------------------------------------------------------------

def apply_rules(
    rules: Iterable[TensorRule],
    names: Iterable[str],
    get_tensor: GetTensor,
    *,
    ignore: Callable[[str], bool] = lambda name: False,
    dtype: Any = np.float32,
    model_name: str = "model",
    place: Place | None = None,
) -> dict:
    """Builds a params tree from ``rules`` over a lazily read checkpoint.

    ``names`` lists every tensor of the checkpoint and ``get_tensor`` reads one; ``ignore(name)``
    marks tensors that are expected but unused (tied duplicates, rotary buffers, ...). Raises
    ``ConversionError`` naming the tensor for a missing tensor, a wrong shape, or leftovers.
    Tensors are read, converted and handed to ``place`` one at a time.
    """
    available = set(names)
    rules = list(rules)
    # Name problems are found before any tensor is read (a 13B checkpoint takes minutes to read).
    for rule in rules:
        if rule.hf_name not in available:
            raise ConversionError(
                f"{model_name}: missing tensor {rule.hf_name!r} (expected shape {rule.hf_shape} for this config)"
            )
    leftovers = sorted(available - {r.hf_name for r in rules} - {n for n in available if ignore(n)})
    if leftovers:
        more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        raise ConversionError(
            f"{model_name}: the checkpoint has tensors this config has no place for: {leftovers[:5]}{more} "
            "(more layers than the config, or a different architecture)"
        )
    params: dict = {}
    for rule in rules:
        array = np.asarray(get_tensor(rule.hf_name))
        if tuple(array.shape) != tuple(rule.hf_shape):
            raise ConversionError(
                f"{model_name}: tensor {rule.hf_name!r} has shape {tuple(array.shape)} but the config "
                f"expects {tuple(rule.hf_shape)}"
            )
        node = params
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        if rule.path[-1] in node:
            raise ValueError(f"two rules write the parameter {'/'.join(rule.path)}")  # a converter bug
        converted = np.ascontiguousarray(rule.transform(array.astype(np.float32))).astype(dtype)
        del array
        node[rule.path[-1]] = converted if place is None else place(rule.path, converted)
    return params


def tensors_equal(get_tensor: GetTensor, a: str, b: str) -> bool:
    x, y = np.asarray(get_tensor(a)), np.asarray(get_tensor(b))
    return x.shape == y.shape and bool(np.array_equal(x.astype(np.float32), y.astype(np.float32)))


def common_prefix(names: Iterable[str], anchor: str, prefixes: Sequence[str], model_name: str) -> str:
    """The first of ``prefixes`` under which the tensor ``anchor`` exists (e.g. 'model.')."""
    names = set(names)
    for prefix in prefixes:
        if prefix + anchor in names:
            return prefix
    raise ConversionError(
        f"no {model_name} tensors found: looked for {anchor!r} under the prefixes "
        f"{[p or '(none)' for p in prefixes]}"
    )


# --- files ------------------------------------------------------------------------------------

class HFCheckpoint:
    """A HF checkpoint directory, read tensor by tensor (safetensors, single file or sharded)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        single = os.path.join(self.directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {name: os.path.join(self.directory, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="np") as f:
                self._file_of = {name: single for name in f.keys()}
        else:
            raise ConversionError(
                f"{self.directory} has neither model.safetensors nor model.safetensors.index.json"
            )
        self._handles: dict[str, Any] = {}

    def config(self) -> dict:
        path = os.path.join(self.directory, "config.json")
        if not os.path.exists(path):
            raise ConversionError(f"{self.directory} has no config.json")
        with open(path) as f:
            return json.load(f)

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> np.ndarray:
        """One tensor as numpy (bf16 comes back as ml_dtypes.bfloat16)."""
        from safetensors import safe_open

        if name not in self._file_of:
            raise ConversionError(f"{self.directory} has no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            if not os.path.exists(path):
                raise ConversionError(f"shard {path} (holding {name!r}) does not exist")
            self._handles[path] = safe_open(path, framework="np")
        return self._handles[path].get_tensor(name)


def check_config_matches(expected: Any, from_checkpoint: Any, skip: Iterable[str], source: str) -> None:
    """Raises when a config dataclass disagrees with the one read from a checkpoint's config.json.

    Shapes alone do not catch e.g. a different rope_theta or norm epsilon, so the converters
    compare every architectural field (``skip`` lists the run-time ones: dtypes, remat, ...).
    """
    skip = set(skip)
    for field in dataclasses.fields(expected):
        if field.name in skip:
            continue
        want, got = getattr(expected, field.name), getattr(from_checkpoint, field.name)
        if dataclasses.is_dataclass(want) and dataclasses.is_dataclass(got):
            # A nested config (e.g. a transcriber's encoder): its own run-time fields are
            # skipped as 'name.field', and a difference is named by that path.
            inner = [s[len(field.name) + 1:] for s in skip if s.startswith(field.name + ".")]
            try:
                check_config_matches(want, got, inner, source)
            except ConversionError as e:
                raise ConversionError(str(e).replace(f"{source}: config.json gives ",
                                                     f"{source}: config.json gives {field.name}.", 1)) from None
            continue
        if want != got:
            raise ConversionError(
                f"{source}: config.json gives {field.name}={got!r} but the configured model has {want!r}"
            )


def as_state_dict_reader(state_dict: Mapping[str, Any]) -> tuple[list[str], GetTensor]:
    """(names, get_tensor) over an in-memory {name: array} dict (numpy or torch CPU tensors)."""

    def get(name: str) -> np.ndarray:
        value = state_dict[name]
        if hasattr(value, "detach"):  # a torch tensor: no torch import needed here
            value = value.detach().float().cpu().numpy()
        return np.asarray(value)

    return list(state_dict.keys()), get


@dataclasses.dataclass(frozen=True)
class FamilyLoaders:
    """The three entry points every converter module exposes, built from its two family-specific
    functions, so Whisper, T5 and Llama share one implementation of them.

    ``config_from_hf(hf_config_dict, **overrides) -> our config`` and
    ``convert_tensors(names, get_tensor, cfg, dtype, place) -> params``.
    """

    config_from_hf: Callable[..., Any]
    convert_tensors: Callable[..., dict]
    runtime_fields: Iterable[str]

    def params_from_state_dict(self, state_dict: Mapping[str, Any], cfg: Any, dtype=np.float32,
                               place: Callable | None = None) -> dict:
        """Our params tree from an in-memory HF state dict {name: numpy array or torch tensor}."""
        names, get = as_state_dict_reader(state_dict)
        return self.convert_tensors(names, get, cfg, dtype, place)

    def load_checkpoint(self, path: str | os.PathLike, dtype=np.float32, **config_overrides) -> tuple[Any, dict]:
        """(config, params) from a HF checkpoint directory (config.json + safetensors, single or
        sharded). ``config_overrides`` go to ``config_from_hf`` (e.g. a compute dtype)."""
        checkpoint = HFCheckpoint(path)
        cfg = self.config_from_hf(checkpoint.config(), **config_overrides)
        return cfg, self.convert_tensors(checkpoint.names(), checkpoint.get, cfg, dtype, None)

    def load_params(self, path: str | os.PathLike, cfg: Any, dtype=np.float32, place: Callable | None = None) -> dict:
        """Params for an already chosen ``cfg`` from a HF checkpoint directory.

        The directory's config.json must describe the same architecture (run-time fields such as
        dtypes and remat aside): a mismatch names the field rather than surfacing later as a
        tensor shape error.
        """
        checkpoint = HFCheckpoint(path)
        check_config_matches(cfg, self.config_from_hf(checkpoint.config()), self.runtime_fields, os.fspath(path))
        return self.convert_tensors(checkpoint.names(), checkpoint.get, cfg, dtype, place)
