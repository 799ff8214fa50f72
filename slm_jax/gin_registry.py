"""Registers every configurable that gin files may name. Imported by the CLIs before parsing.

Model files stay free of gin: their config dataclasses and presets are registered here, under
the module paths a reader would look for them in.
"""

from __future__ import annotations

import importlib

import gin

from slm_jax.training import augment, loop as train, objectives  # noqa: F401
from slm_jax.data.cached import corpus_data as cached_corpus
from slm_jax.models import spec as experiment
from slm_jax.data import prompting, synthetic as synthetic_data
from slm_jax.models import adapter

_REGISTERED = False


def _register(obj, module: str) -> None:
    gin.external_configurable(obj, module=module)


def register_all() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    _register(experiment.ModelSpec, "slm_jax.models.spec")
    _register(adapter.AdapterConfig, "slm_jax.models.adapter")
    _register(augment.SpeechMasking, "slm_jax.training.augment")
    for objective in (objectives.NextToken, objectives.CtcAlignment, objectives.NextTokenWithAlignment):
        _register(objective, "slm_jax.training.objectives")
    _register(importlib.import_module("slm_jax.training.distillation").Distillation, "slm_jax.training.distillation")
    _register(synthetic_data.SyntheticData, "slm_jax.data.synthetic")
    _register(cached_corpus.CachedCorpusData, "slm_jax.data.cached.corpus_data")
    _register(prompting.PromptFormat, "slm_jax.data.prompting")
    # Model configs: gin files spell out every dimension (configs as data, T5X style).
    for module_name, names in {
        "slm_jax.models.encoders.whisper": ["WhisperEncoderConfig"],
        "slm_jax.contrib.whisper_cascade.whisper_decoder": ["WhisperDecoderConfig"],
        "slm_jax.contrib.whisper_cascade.front_end": ["WhisperTranscriberConfig"],
        "slm_jax.models.encoders.conformer": ["ConformerConfig"],
        "slm_jax.models.llms.t5": ["T5Config"],
        "slm_jax.models.llms.llama": ["LlamaConfig"],
    }.items():
        module = importlib.import_module(module_name)
        for name in names:
            _register(getattr(module, name), module_name)
    # The SeqIO DataSource (light to import: TensorFlow/SeqIO load when data is first read).
    from slm_jax.data.seqio import source as seqio_data

    _register(seqio_data.SeqioData, "slm_jax.data.seqio.source")


register_all()
