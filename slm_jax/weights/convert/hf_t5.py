"""Hugging Face T5-family checkpoints -> ``T5`` parameters.

Architectures (config.json ``model_type``): t5 (T5 v1.0, T5 v1.1, Flan-T5) and mt5 (mT5, mT0).

HF layout -> ours (N = layer index):
  shared.weight [V, d]                                  -> token_embedder.embedding
  {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, H]
                                                        -> {encoder,decoder}_relative_bias.rel_embedding
  *.SelfAttention / EncDecAttention .{q,k,v}.weight [H*dkv, d] -> *_attention.{query,key,value}.kernel [d, H, dkv]
  *.o.weight [d, H*dkv]                                 -> *_attention.out.kernel [H, dkv, d]
  *.DenseReluDense.{wi_0,wi_1,wi,wo}.weight             -> mlp.{wi_0,wi_1,wi,wo}.kernel (transposed)
  encoder.block.N.layer.{0,1}.layer_norm                -> encoder_layers_N.{self_attention_norm,mlp_norm}
  decoder.block.N.layer.{0,1,2}.layer_norm              -> decoder_layers_N.{self_attention_norm,
                                                           cross_attention_norm,mlp_norm}
  {enc,dec}oder.final_layer_norm.weight                 -> {encoder,decoder}_final_norm.scale
  lm_head.weight [V, d]                                 -> lm_head.kernel [d, V] (untied configs)

Tied vs untied: transformers 5 always ties ``lm_head`` to ``shared`` when it builds a model and
records the T5 v1.0 output scaling as ``scale_decoder_outputs``; 4.x configs record it as
``tie_word_embeddings``. Our ``tie_word_embeddings`` means "tied head AND scaled" (T5 v1.0). An
untied config whose checkpoint has no ``lm_head.weight`` (saved tied by transformers 5) takes
its head from ``shared.weight``, which is exactly what the reference computes.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from slm_jax.weights.convert.errors import ConversionError
from slm_jax.weights.convert.hf_checkpoint import (
    FamilyLoaders,
    GetTensor,
    Place,
    TensorRule,
    apply_rules,
    linear_to_kernel,
    tensors_equal,
)
from slm_jax.models.llms.t5 import T5Config, parse_feed_forward_proj

SUPPORTED_MODEL_TYPES = ("t5", "mt5")

# Config fields that are run-time choices, not architecture (not compared with config.json).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_implementation")

# Tensors the reference keeps but never uses: tied copies of ``shared`` and a relative bias that
# HF's own loader discards.
_IGNORED = {
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}


def _scales_decoder_output(config_json: Mapping[str, Any], model_type: str) -> bool:
    if "scale_decoder_outputs" in config_json:  # transformers >= 5
        return bool(config_json["scale_decoder_outputs"])
    if model_type == "mt5":  # mT5/mT0 never tie nor scale
        return False
    return bool(config_json.get("tie_word_embeddings", True))  # 4.x: tied <=> scaled (v1.0)


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> T5Config:
    """Our ``T5Config`` from a HF T5/mT5 config.json dict; ``overrides`` win (e.g. dtype='bfloat16')."""
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={config_json.get('architectures')!r}; "
            f"the T5-family converter handles model_type in {SUPPORTED_MODEL_TYPES}"
        )
    feed_forward_proj = config_json.get("feed_forward_proj", "relu")
    try:
        parse_feed_forward_proj(feed_forward_proj)
    except ValueError as e:
        raise ConversionError(f"{model_type}: {e}") from None
    try:
        num_layers = int(config_json["num_layers"])
        fields = dict(
            vocab_size=int(config_json["vocab_size"]),
            d_model=int(config_json["d_model"]),
            d_kv=int(config_json["d_kv"]),
            d_ff=int(config_json["d_ff"]),
            num_layers=num_layers,
            num_decoder_layers=int(config_json.get("num_decoder_layers") or num_layers),
            num_heads=int(config_json["num_heads"]),
            relative_attention_num_buckets=int(config_json.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(config_json.get("relative_attention_max_distance", 128)),
            feed_forward_proj=feed_forward_proj,
            tie_word_embeddings=_scales_decoder_output(config_json, model_type),
            layer_norm_epsilon=float(config_json.get("layer_norm_epsilon", 1e-6)),
        )
    except KeyError as e:
        raise ConversionError(f"{model_type} config.json lacks the field {e.args[0]!r}") from None
    fields.update(overrides)
    return T5Config(**fields)


def _attention_rules(cfg: T5Config, hf: str, ours: tuple[str, ...]) -> list[TensorRule]:
    d, h, dkv = cfg.d_model, cfg.num_heads, cfg.d_kv
    rules = [
        TensorRule(f"{hf}.{proj}.weight", (h * dkv, d), (*ours, name, "kernel"), linear_to_kernel((d,), (h, dkv)))
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    rules.append(TensorRule(f"{hf}.o.weight", (d, h * dkv), (*ours, "out", "kernel"), linear_to_kernel((h, dkv), (d,))))
    return rules


def _mlp_rules(cfg: T5Config, hf: str, ours: tuple[str, ...]) -> list[TensorRule]:
    d, f = cfg.d_model, cfg.d_ff
    inputs = ("wi_0", "wi_1") if cfg.mlp_gated else ("wi",)
    rules = [TensorRule(f"{hf}.{name}.weight", (f, d), (*ours, name, "kernel"), linear_to_kernel((d,), (f,)))
             for name in inputs]
    rules.append(TensorRule(f"{hf}.wo.weight", (d, f), (*ours, "wo", "kernel"), linear_to_kernel((f,), (d,))))
    return rules


def _norm_rule(cfg: T5Config, hf: str, ours: tuple[str, ...]) -> TensorRule:
    return TensorRule(f"{hf}.weight", (cfg.d_model,), (*ours, "scale"))


def _rules(cfg: T5Config, lm_head_name: str | None) -> list[TensorRule]:
    d, v = cfg.d_model, cfg.vocab_size
    buckets = (cfg.relative_attention_num_buckets, cfg.num_heads)
    rules = [
        TensorRule("shared.weight", (v, d), ("token_embedder", "embedding")),
        TensorRule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", buckets,
                   ("encoder_relative_bias", "rel_embedding")),
        TensorRule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", buckets,
                   ("decoder_relative_bias", "rel_embedding")),
        _norm_rule(cfg, "encoder.final_layer_norm", ("encoder_final_norm",)),
        _norm_rule(cfg, "decoder.final_layer_norm", ("decoder_final_norm",)),
    ]
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.block.{i}.layer", f"encoder_layers_{i}"
        rules += _attention_rules(cfg, f"{hf}.0.SelfAttention", (ours, "self_attention"))
        rules.append(_norm_rule(cfg, f"{hf}.0.layer_norm", (ours, "self_attention_norm")))
        rules += _mlp_rules(cfg, f"{hf}.1.DenseReluDense", (ours, "mlp"))
        rules.append(_norm_rule(cfg, f"{hf}.1.layer_norm", (ours, "mlp_norm")))
    for i in range(cfg.num_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", f"decoder_layers_{i}"
        rules += _attention_rules(cfg, f"{hf}.0.SelfAttention", (ours, "self_attention"))
        rules.append(_norm_rule(cfg, f"{hf}.0.layer_norm", (ours, "self_attention_norm")))
        rules += _attention_rules(cfg, f"{hf}.1.EncDecAttention", (ours, "cross_attention"))
        rules.append(_norm_rule(cfg, f"{hf}.1.layer_norm", (ours, "cross_attention_norm")))
        rules += _mlp_rules(cfg, f"{hf}.2.DenseReluDense", (ours, "mlp"))
        rules.append(_norm_rule(cfg, f"{hf}.2.layer_norm", (ours, "mlp_norm")))
    if lm_head_name is not None:
        rules.append(TensorRule(lm_head_name, (v, d), ("lm_head", "kernel"), linear_to_kernel((d,), (v,))))
    return rules


def convert_tensors(names, get_tensor: GetTensor, cfg: T5Config, dtype=np.float32,
                    place: Place | None = None) -> dict:
    """Our params tree from a lazily read checkpoint (``names``; ``get_tensor(name)`` reads one).

    Raises ``ConversionError`` for a missing tensor, a wrong shape, tensors the config has no
    place for, or a separate ``lm_head.weight`` that differs from ``shared`` in a tied config.
    """
    names = list(names)
    has_head = "lm_head.weight" in names
    if cfg.tie_word_embeddings:
        if has_head and "shared.weight" in names and not tensors_equal(get_tensor, "lm_head.weight", "shared.weight"):
            raise ConversionError(
                "the checkpoint has its own lm_head.weight but the config ties it to shared.weight "
                "(tie_word_embeddings=True, T5 v1.0); set tie_word_embeddings=False (T5 v1.1 / mT5)"
            )
        lm_head_name = None
    else:
        # A tied save (transformers 5) stores the head only as shared.weight.
        lm_head_name = "lm_head.weight" if has_head else "shared.weight"
    rules = _rules(cfg, lm_head_name)
    def ignore(name: str) -> bool:
        return name in _IGNORED or (lm_head_name is None and name == "lm_head.weight")

    return apply_rules(rules, names, get_tensor, ignore=ignore, dtype=dtype, model_name="T5",
                       place=place)


_LOADERS = FamilyLoaders(config_from_hf, convert_tensors, RUNTIME_FIELDS)
params_from_state_dict = _LOADERS.params_from_state_dict
load_checkpoint = _LOADERS.load_checkpoint
load_params = _LOADERS.load_params
