"""Which Hugging Face converter handles a checkpoint or a model config.

Every converter module (``hf_whisper``, ``hf_t5``, ``hf_llama``) offers the same functions:
``config_from_hf``, ``convert_tensors``, ``params_from_state_dict``, ``load_params``,
``load_checkpoint`` and ``RUNTIME_FIELDS``, so callers pick a module here and use it generically.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping

from slm_jax.weights.convert.errors import ConversionError

# Family name -> (converter module, our config class name, HF model_types).
FAMILIES = {
    "whisper": ("slm_jax.weights.convert.hf_whisper", "WhisperEncoderConfig", ("whisper",)),
    # Whisper's encoder and decoder together (no model_type of its own: a whole Whisper checkpoint
    # loads as this only when the config asks for a WhisperTranscriberConfig).
    "whisper_transcriber": ("slm_jax.contrib.whisper_cascade.convert", "WhisperTranscriberConfig", ()),
    "t5": ("slm_jax.weights.convert.hf_t5", "T5Config", ("t5", "mt5")),
    "llama": ("slm_jax.weights.convert.hf_llama", "LlamaConfig", ("llama", "qwen2", "mistral", "gemma")),
}



def family_of_hf_config(config_json: Mapping[str, Any]) -> str:
    """'whisper', 't5' or 'llama' from a config.json's model_type."""
    model_type = config_json.get("model_type")
    for family, (_, _, model_types) in FAMILIES.items():
        if model_type in model_types:
            return family
    known = sorted(t for _, _, types in FAMILIES.values() for t in types)
    raise ConversionError(
        f"unknown architecture: model_type={model_type!r}, architectures={config_json.get('architectures')!r}; "
        f"converters exist for model_type in {known}"
    )


def family_of_config(config: Any) -> str:
    """The family whose converter builds params for one of our config objects."""
    name = type(config).__name__
    for family, (_, config_class, _) in FAMILIES.items():
        if name == config_class:
            return family
    raise ConversionError(f"no Hugging Face converter loads weights for {name}")


def converter(family: str) -> ModuleType:
    if family not in FAMILIES:
        raise ConversionError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family][0])


def config_class(family: str) -> type:
    """Our config dataclass for a family (the one its converter's config_from_hf returns)."""
    return getattr(converter(family), FAMILIES[family][1])
