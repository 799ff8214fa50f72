"""Hugging Face ``WhisperForConditionalGeneration`` checkpoints -> ``WhisperTranscriber`` params
(encoder *and* decoder; see slm_jax/contrib/whisper_cascade/front_end.py).

The encoder's tensors map as in ``hf_whisper``; the decoder's:
  embed_tokens.weight [V, D]      -> decoder/embed_tokens/embedding (also the tied output layer;
                                     ``proj_out.weight`` is the same tensor and is not read)
  embed_positions.weight [P, D]   -> decoder/embed_positions
  layers.N.{self_attn,encoder_attn}.{q,k,v,out}_proj -> decoder/layers_N/{self_attn,encoder_attn}/...
  layers.N.fc1 / fc2              -> decoder/layers_N/mlp/wi / wo
  *layer_norm                     -> scale / bias
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from slm_jax.weights.convert import hf_whisper
from slm_jax.weights.convert.errors import ConversionError
from slm_jax.weights.convert.hf_checkpoint import (
    FamilyLoaders,
    GetTensor,
    Place,
    TensorRule,
    apply_rules,
    common_prefix,
    linear_to_kernel,
)
from slm_jax.contrib.whisper_cascade.whisper_decoder import WhisperDecoderConfig
from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriberConfig

DECODER_PREFIXES = ("decoder.", "model.decoder.")
# Run-time choices of the front end, not the checkpoint's architecture (the encoder's and
# decoder's own architecture fields are compared; see hf_checkpoint.check_config_matches).
RUNTIME_FIELDS = (
    "language_ids", "task_ids", "max_new_tokens", "trailing_silence_frames", "stop_on_repeated_ngram",
    "llm_vocabulary", "llm_tokens_per_token", "llm_token_rows", "decoder_states", "whisper_tokenizer", "speeds",
    *(f"encoder.{name}" for name in hf_whisper.RUNTIME_FIELDS), "decoder.dtype", "decoder.param_dtype",
)


def config_from_hf(config_json: Mapping[str, Any], **overrides) -> WhisperTranscriberConfig:
    encoder = hf_whisper.config_from_hf(config_json)
    try:
        decoder = WhisperDecoderConfig(
            vocab_size=int(config_json["vocab_size"]),
            d_model=int(config_json["d_model"]),
            num_layers=int(config_json["decoder_layers"]),
            num_heads=int(config_json["decoder_attention_heads"]),
            ffn_dim=int(config_json["decoder_ffn_dim"]),
            max_target_positions=int(config_json["max_target_positions"]),
            activation=encoder.activation,
        )
    except KeyError as e:
        raise ConversionError(f"Whisper config.json lacks the decoder field {e.args[0]!r}") from None
    fields = {"encoder": encoder, "decoder": decoder}
    # The special tokens config.json names (a converted CTranslate2 config may not name them).
    for ours, theirs in (("start_of_transcript", "decoder_start_token_id"), ("end_of_text", "eos_token_id")):
        if config_json.get(theirs) is not None:
            fields[ours] = int(config_json[theirs])
    fields.update(overrides)
    # The default transcript length, cut to what the decoder's position table holds.
    default = WhisperTranscriberConfig.__dataclass_fields__["max_new_tokens"].default
    if "max_new_tokens" not in fields:
        prompt = WhisperTranscriberConfig(**{**fields, "max_new_tokens": 1}).prompt_length
        fields["max_new_tokens"] = min(default, decoder.max_target_positions - prompt)
    return WhisperTranscriberConfig(**fields)


def decoder_rules(cfg: WhisperDecoderConfig, prefix: str, root: tuple[str, ...] = ()) -> list[TensorRule]:
    d, f, h, dh = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.head_dim
    rules = [
        TensorRule(prefix + "embed_tokens.weight", (cfg.vocab_size, d), (*root, "embed_tokens", "embedding")),
        TensorRule(prefix + "embed_positions.weight", (cfg.max_target_positions, d), (*root, "embed_positions")),
        TensorRule(prefix + "layer_norm.weight", (d,), (*root, "layer_norm", "scale")),
        TensorRule(prefix + "layer_norm.bias", (d,), (*root, "layer_norm", "bias")),
    ]
    for i in range(cfg.num_layers):
        hf, layer = f"{prefix}layers.{i}", (*root, f"layers_{i}")
        rules += hf_whisper.attention_rules(f"{hf}.self_attn", (*layer, "self_attn"), d, h, dh)
        rules += hf_whisper.attention_rules(f"{hf}.encoder_attn", (*layer, "encoder_attn"), d, h, dh)
        rules += [
            TensorRule(f"{hf}.fc1.weight", (f, d), (*layer, "mlp", "wi", "kernel"), linear_to_kernel((d,), (f,))),
            TensorRule(f"{hf}.fc1.bias", (f,), (*layer, "mlp", "wi", "bias")),
            TensorRule(f"{hf}.fc2.weight", (d, f), (*layer, "mlp", "wo", "kernel"), linear_to_kernel((f,), (d,))),
            TensorRule(f"{hf}.fc2.bias", (d,), (*layer, "mlp", "wo", "bias")),
        ]
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            rules += [TensorRule(f"{hf}.{norm}.weight", (d,), (*layer, norm, "scale")),
                      TensorRule(f"{hf}.{norm}.bias", (d,), (*layer, norm, "bias"))]
    return rules


def convert_tensors(names, get_tensor: GetTensor, cfg: WhisperTranscriberConfig, dtype=np.float32,
                    place: Place | None = None) -> dict:
    """{'encoder': ..., 'decoder': ...} from a whole Whisper checkpoint (lazily read)."""
    names = list(names)
    encoder_prefix = common_prefix(names, "conv1.weight", hf_whisper.ENCODER_PREFIXES[1:], "Whisper encoder")
    decoder_prefix = common_prefix(names, "embed_tokens.weight", DECODER_PREFIXES, "Whisper decoder")
    rules = [TensorRule(r.hf_name, r.hf_shape, ("encoder", *r.path), r.transform)
             for r in hf_whisper.encoder_rules(cfg.encoder, encoder_prefix)]
    rules += decoder_rules(cfg.decoder, decoder_prefix, ("decoder",))
    return apply_rules(rules, names, get_tensor, ignore=lambda name: name == "proj_out.weight", dtype=dtype,
                       model_name="Whisper transcriber", place=place)


_LOADERS = FamilyLoaders(config_from_hf, convert_tensors, RUNTIME_FIELDS)
params_from_state_dict = _LOADERS.params_from_state_dict
load_checkpoint = _LOADERS.load_checkpoint
load_params = _LOADERS.load_params
