"""Maps model config dataclasses to their linen modules, so configs (gin) stay pure data."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import flax.linen as nn

# config class name -> (module path, module class name)
_MODULES = {
    "WhisperEncoderConfig": ("slm_jax.models.encoders.whisper", "WhisperEncoder"),
    "WhisperTranscriberConfig": ("slm_jax.contrib.whisper_cascade.front_end", "WhisperTranscriber"),
    "ConformerConfig": ("slm_jax.models.encoders.conformer", "Conformer"),
    "T5Config": ("slm_jax.models.llms.t5", "T5"),
    "LlamaConfig": ("slm_jax.models.llms.llama", "Llama"),
}


def module_for(config: Any) -> nn.Module:
    name = type(config).__name__
    if name not in _MODULES:
        raise ValueError(f"no model is registered for config type {name}; known: {sorted(_MODULES)}")
    path, cls = _MODULES[name]
    return getattr(importlib.import_module(path), cls)(config=config)


def llm_embed_dim(config: Any) -> int:
    for field in ("hidden_size", "d_model"):
        if hasattr(config, field):
            return int(getattr(config, field))
    raise ValueError(f"cannot tell the embedding width of LLM config {type(config).__name__}")


def llm_vocab_size(config: Any) -> int:
    return int(config.vocab_size)


def replace(config: Any, **changes) -> Any:
    return dataclasses.replace(config, **changes)
