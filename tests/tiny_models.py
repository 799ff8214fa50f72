"""Tiny SLMs for tests: every dimension divisible by 8 where it matters, so an 8-way model axis
really shards heads, MLP and vocabulary."""

from __future__ import annotations

import jax.numpy as jnp

from slm_jax.models.spec import ModelSpec
from slm_jax.models.adapter import AdapterConfig

FEATURE_LENGTHS = {"audio_frames": 48, "prefix": 4, "suffix": 6, "targets": 8}
VOCAB = 128


def speech_encoder_config(kind: str):
    if kind == "whisper":
        from slm_jax.models.encoders.whisper import WhisperEncoderConfig

        return WhisperEncoderConfig(num_mel_bins=80, d_model=32, num_layers=1, num_heads=8, ffn_dim=64,
                                    max_source_positions=64)
    from slm_jax.models.encoders.conformer import ConformerConfig

    return ConformerConfig(num_mel_bins=80, d_model=32, num_layers=1, num_heads=8, ffn_dim=64, conv_kernel_size=5)


def llm_config(kind: str):
    if kind == "t5":
        from slm_jax.models.llms.t5 import T5Config

        return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                        num_heads=8, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    from slm_jax.models.llms.llama import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8,
                       num_kv_heads=8, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def model_spec(llm: str = "t5", encoder: str = "whisper", **adapter_overrides) -> ModelSpec:
    adapter = AdapterConfig(**{**dict(output_dim=0, d_model=32, num_layers=2, num_heads=8, ffn_dim=64),
                               **adapter_overrides})
    return ModelSpec(speech_encoder=speech_encoder_config(encoder), llm=llm_config(llm), adapter=adapter,
                     speech_encoder_source="random:0", llm_source="random:1")
