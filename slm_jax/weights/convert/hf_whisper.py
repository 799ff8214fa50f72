"""Hugging Face Whisper checkpoints -> ``WhisperEncoder`` parameters.

Accepts the encoder tensors of a ``WhisperEncoder``, ``WhisperModel`` or
``WhisperForConditionalGeneration`` state dict (keys optionally prefixed ``encoder.`` or
``model.encoder.``); decoder tensors are ignored. Files are read tensor by tensor (``hf_checkpoint``), so
converting large-v3 never holds the decoder (or a second copy of the encoder) in memory.

HF layouts and ours:
  conv{1,2}.weight      [out, in, k]           -> conv{1,2}.kernel [k, in, out]
  *_proj.weight         [out, in] (torch Linear) -> DenseGeneral kernel [in, ...out], reshaped
                                                    to heads for q/k/v ([d, H, Dh]) and out ([H, Dh, d])
  fc1 / fc2             Linear                   -> mlp.wi / mlp.wo
  *layer_norm.weight    -> scale
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from slm_jax.weights.convert.errors import ConversionError
from slm_jax.weights.convert.hf_checkpoint import (
    FamilyLoaders,
    GetTensor,
    Place,
    TensorRule,
    apply_rules,
    common_prefix,
    linear_to_kernel,
    reshape_to,
)
from slm_jax.models.encoders.whisper import WhisperEncoderConfig

__all__ = ["ConversionError", "config_from_hf", "convert_tensors", "load_params", "load_whisper_encoder",
           "params_from_state_dict"]

# Tried in this order; the first under which ``conv1.weight`` exists wins.
ENCODER_PREFIXES = ("", "encoder.", "model.encoder.")

# HF ``activation_function`` -> our MLP activation names.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# Config fields that are run-time choices, not architecture (not compared with config.json).
RUNTIME_FIELDS = ("mask_padding", "dtype", "param_dtype", "attention_implementation")


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> WhisperEncoderConfig:
    """Our encoder config from a HF Whisper ``config.json`` dict; ``overrides`` win (e.g. mask_padding)."""
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    if model_type != "whisper" and not any(a.startswith("Whisper") for a in architectures):
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={architectures!r}; "
            "expected a Hugging Face Whisper config (model_type 'whisper')"
        )
    activation = config_json.get("activation_function", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise ConversionError(
            f"unsupported Whisper activation_function {activation!r}; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    try:
        fields = dict(
            num_mel_bins=int(config_json["num_mel_bins"]),
            d_model=int(config_json["d_model"]),
            num_layers=int(config_json["encoder_layers"]),
            num_heads=int(config_json["encoder_attention_heads"]),
            ffn_dim=int(config_json["encoder_ffn_dim"]),
            max_source_positions=int(config_json["max_source_positions"]),
            activation=_HF_ACTIVATIONS[activation],
            # HF's Whisper LayerNorms use torch's default eps (not read from the config).
            layer_norm_eps=1e-5,
        )
    except KeyError as e:
        raise ConversionError(f"Whisper config.json lacks the field {e.args[0]!r}") from None
    fields.update(overrides)
    return WhisperEncoderConfig(**fields)


# --- tensor mapping ----------------------------------------------------------------------------

def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 1, 0))  # [out, in, k] -> [k, in, out]


def attention_rules(hf: str, path: tuple[str, ...], d: int, h: int, dh: int) -> list[TensorRule]:
    """One Whisper attention block (``hf``.{q,k,v,out}_proj) -> our ``Attention`` at ``path``.
    Whisper's key projection has no bias."""
    rules = []
    for proj, name, bias in (("q_proj", "query", True), ("k_proj", "key", False), ("v_proj", "value", True)):
        rules.append(TensorRule(f"{hf}.{proj}.weight", (d, d), (*path, name, "kernel"), linear_to_kernel((d,), (h, dh))))
        if bias:
            rules.append(TensorRule(f"{hf}.{proj}.bias", (d,), (*path, name, "bias"), reshape_to((h, dh))))
    return rules + [
        TensorRule(f"{hf}.out_proj.weight", (d, d), (*path, "out", "kernel"), linear_to_kernel((h, dh), (d,))),
        TensorRule(f"{hf}.out_proj.bias", (d,), (*path, "out", "bias")),
    ]


def encoder_rules(cfg: WhisperEncoderConfig, prefix: str) -> list[TensorRule]:
    d, f, h, dh = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.head_dim
    rules = [
        TensorRule(prefix + "conv1.weight", (d, cfg.num_mel_bins, 3), ("conv1", "kernel"), _conv),
        TensorRule(prefix + "conv1.bias", (d,), ("conv1", "bias")),
        TensorRule(prefix + "conv2.weight", (d, d, 3), ("conv2", "kernel"), _conv),
        TensorRule(prefix + "conv2.bias", (d,), ("conv2", "bias")),
        TensorRule(prefix + "embed_positions.weight", (cfg.max_source_positions, d), ("embed_positions",)),
        TensorRule(prefix + "layer_norm.weight", (d,), ("layer_norm", "scale")),
        TensorRule(prefix + "layer_norm.bias", (d,), ("layer_norm", "bias")),
    ]
    for i in range(cfg.num_layers):
        hf = f"{prefix}layers.{i}."
        rules += attention_rules(f"{hf}self_attn", (f"layers_{i}", "self_attn"), d, h, dh)
        rules += [
            TensorRule(f"{hf}fc1.weight", (f, d), (f"layers_{i}", "mlp", "wi", "kernel"), linear_to_kernel((d,), (f,))),
            TensorRule(f"{hf}fc1.bias", (f,), (f"layers_{i}", "mlp", "wi", "bias")),
            TensorRule(f"{hf}fc2.weight", (d, f), (f"layers_{i}", "mlp", "wo", "kernel"), linear_to_kernel((f,), (d,))),
            TensorRule(f"{hf}fc2.bias", (d,), (f"layers_{i}", "mlp", "wo", "bias")),
        ]
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            rules += [TensorRule(f"{hf}{norm}.weight", (d,), (f"layers_{i}", norm, "scale")),
                      TensorRule(f"{hf}{norm}.bias", (d,), (f"layers_{i}", norm, "bias"))]
    return rules


_ENCODER_TENSOR = re.compile(r"^(conv[12]|embed_positions|layer_norm|layers\.\d+)\.")


def convert_tensors(names, get_tensor: GetTensor, cfg: WhisperEncoderConfig, dtype=np.float32,
                    place: Place | None = None) -> dict:
    """Our params tree from a lazily read checkpoint (``names``; ``get_tensor(name)`` reads one).

    Decoder tensors are skipped unread. Raises ``ConversionError`` for a missing tensor, a shape
    that disagrees with ``cfg``, or an encoder tensor the config has no place for (e.g. a layer
    beyond ``cfg.num_layers``).
    """
    names = list(names)
    prefix = common_prefix(names, "conv1.weight", ENCODER_PREFIXES, "Whisper encoder")

    def ignore(name: str) -> bool:  # anything outside the encoder (decoder, proj_out, ...)
        return not (name.startswith(prefix) and _ENCODER_TENSOR.match(name[len(prefix):]))

    return apply_rules(encoder_rules(cfg, prefix), names, get_tensor, ignore=ignore, dtype=dtype,
                       model_name="Whisper encoder", place=place)


_LOADERS = FamilyLoaders(config_from_hf, convert_tensors, RUNTIME_FIELDS)
params_from_state_dict = _LOADERS.params_from_state_dict
load_checkpoint = _LOADERS.load_checkpoint
load_params = _LOADERS.load_params
load_whisper_encoder = load_checkpoint  # the name the Whisper tests and tools know
