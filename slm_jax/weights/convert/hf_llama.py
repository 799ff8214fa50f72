"""Hugging Face Llama-family checkpoints -> ``Llama`` parameters.

Architectures (config.json ``model_type``): llama (Llama 2/3, SmolLM, SmolLM2), qwen2 (q/k/v
biases), mistral (without a sliding window) and gemma (v1). State-dict keys may carry the
``model.`` prefix of ``*ForCausalLM`` or none (``*Model``).

HF layout -> ours:
  model.embed_tokens.weight [V, D]              -> embed_tokens.embedding
  layers.N.self_attn.{q,k,v}_proj.weight [H*Dh, D] -> layers_N.self_attention.{query,key,value}.kernel [D, H, Dh]
  layers.N.self_attn.{q,k,v}_proj.bias [H*Dh]      -> ....bias [H, Dh]
  layers.N.self_attn.o_proj.weight [D, H*Dh]       -> layers_N.self_attention.out.kernel [H, Dh, D]
  layers.N.mlp.{gate,up,down}_proj.weight          -> layers_N.mlp.{wi_0,wi_1,wo}.kernel (transposed)
  layers.N.{input,post_attention}_layernorm.weight -> layers_N.{input_norm,post_attention_norm}.scale
  model.norm.weight -> final_norm.scale;  lm_head.weight [V, D] -> lm_head.kernel [D, V] (untied only)
HF's rotary layout ("rotate half") is ours, so q/k need no permutation.
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
    tensors_equal,
)
from slm_jax.models.llms.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma")
_PREFIXES = ("model.", "")

# HF hidden_act -> our MLP activation.
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "gelu": "gelu"}

# Config fields that are run-time choices, not architecture (not compared with config.json).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_implementation", "embedding_init_std")


def _rope_theta(config_json: Mapping[str, Any]) -> float:
    """rope_theta from a transformers 5 ``rope_parameters`` dict or the 4.x top-level fields."""
    rope = config_json.get("rope_parameters") or {}
    scaling = config_json.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(
            f"rope scaling type {rope_type!r} is not supported (only plain RoPE): e.g. Llama 3.1's 'llama3' "
            "frequency scaling would change every position's rotation"
        )
    theta = rope.get("rope_theta", config_json.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> LlamaConfig:
    """Our ``LlamaConfig`` from a HF config.json dict; ``overrides`` win (e.g. dtype='bfloat16')."""
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={config_json.get('architectures')!r}; "
            f"the Llama-family converter handles model_type in {SUPPORTED_MODEL_TYPES}"
        )
    if config_json.get("use_sliding_window") or (model_type == "mistral" and config_json.get("sliding_window")):
        raise ConversionError(f"{model_type}: sliding-window attention is not supported")
    hidden_act = config_json.get("hidden_activation") or config_json.get("hidden_act", "silu")
    if hidden_act not in _HF_ACTIVATIONS:
        raise ConversionError(
            f"{model_type}: unsupported hidden_act {hidden_act!r}; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    try:
        hidden, heads = int(config_json["hidden_size"]), int(config_json["num_attention_heads"])
        is_gemma = model_type == "gemma"
        attention_bias = bool(config_json.get("attention_bias", False))
        fields = dict(
            vocab_size=int(config_json["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config_json["intermediate_size"]),
            num_layers=int(config_json["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config_json.get("num_key_value_heads") or heads),
            head_dim=int(config_json.get("head_dim") or hidden // heads),
            rope_theta=_rope_theta(config_json),
            rms_norm_eps=float(config_json.get("rms_norm_eps", 1e-6)),
            # HF's class defaults: Gemma ties, the others do not.
            tie_word_embeddings=bool(config_json.get("tie_word_embeddings", is_gemma)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(config_json.get("mlp_bias", False)),
            activation=_HF_ACTIVATIONS[hidden_act],
            scale_embeddings=is_gemma,
            norm_scale_offset=1.0 if is_gemma else 0.0,
            embedding_init_std=float(config_json.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ConversionError(f"{model_type} config.json lacks the field {e.args[0]!r}") from None
    fields.update(overrides)
    return LlamaConfig(**fields)


def _rules(cfg: LlamaConfig, prefix: str) -> list[TensorRule]:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rules = [
        TensorRule(prefix + "embed_tokens.weight", (v, d), ("embed_tokens", "embedding")),
        TensorRule(prefix + "norm.weight", (d,), ("final_norm", "scale")),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", (v, d), ("lm_head", "kernel"), linear_to_kernel((d,), (v,))))
    for i in range(cfg.num_layers):
        hf, ours = f"{prefix}layers.{i}.", f"layers_{i}"
        attn = (ours, "self_attention")
        for proj, name, heads in (("q_proj", "query", h), ("k_proj", "key", kvh), ("v_proj", "value", kvh)):
            rules.append(TensorRule(f"{hf}self_attn.{proj}.weight", (heads * dh, d), (*attn, name, "kernel"),
                                    linear_to_kernel((d,), (heads, dh))))
            if cfg.qkv_bias:
                rules.append(TensorRule(f"{hf}self_attn.{proj}.bias", (heads * dh,), (*attn, name, "bias"),
                                        reshape_to((heads, dh))))
        rules.append(TensorRule(f"{hf}self_attn.o_proj.weight", (d, h * dh), (*attn, "out", "kernel"),
                                linear_to_kernel((h, dh), (d,))))
        if cfg.out_bias:
            rules.append(TensorRule(f"{hf}self_attn.o_proj.bias", (d,), (*attn, "out", "bias")))
        mlp = (("gate_proj", "wi_0", (f, d)), ("up_proj", "wi_1", (f, d)), ("down_proj", "wo", (d, f)))
        for proj, name, shape in mlp:
            rules.append(TensorRule(f"{hf}mlp.{proj}.weight", shape, (ours, "mlp", name, "kernel"),
                                    linear_to_kernel((shape[1],), (shape[0],))))
            if cfg.mlp_bias:
                rules.append(TensorRule(f"{hf}mlp.{proj}.bias", (shape[0],), (ours, "mlp", name, "bias")))
        rules += [
            TensorRule(f"{hf}input_layernorm.weight", (d,), (ours, "input_norm", "scale")),
            TensorRule(f"{hf}post_attention_layernorm.weight", (d,), (ours, "post_attention_norm", "scale")),
        ]
    return rules


# Buffers some (older) checkpoints carry that hold no parameters.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def convert_tensors(names, get_tensor: GetTensor, cfg: LlamaConfig, dtype=np.float32,
                    place: Place | None = None) -> dict:
    """Our params tree from a lazily read checkpoint (``names``; ``get_tensor(name)`` reads one).

    Raises ``ConversionError`` for a missing tensor, a wrong shape, tensors the config has no
    place for, or a separate ``lm_head.weight`` that differs from the embeddings of a tied config.
    """
    names = list(names)
    prefix = common_prefix(names, "embed_tokens.weight", _PREFIXES, "Llama-family")
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        if not tensors_equal(get_tensor, "lm_head.weight", prefix + "embed_tokens.weight"):
            raise ConversionError(
                "the checkpoint has its own lm_head.weight but the config ties it to the embeddings "
                "(tie_word_embeddings=True); set tie_word_embeddings=False"
            )
    def ignore(name: str) -> bool:
        return bool(_IGNORED.search(name)) or (cfg.tie_word_embeddings and name == "lm_head.weight")

    return apply_rules(_rules(cfg, prefix), names, get_tensor, ignore=ignore, dtype=dtype, model_name="Llama",
                       place=place)


_LOADERS = FamilyLoaders(config_from_hf, convert_tensors, RUNTIME_FIELDS)
params_from_state_dict = _LOADERS.params_from_state_dict
load_checkpoint = _LOADERS.load_checkpoint
load_params = _LOADERS.load_params
