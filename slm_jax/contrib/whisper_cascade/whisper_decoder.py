"""Whisper's text decoder in linen, numerically equal to Hugging Face's ``WhisperDecoder``.

token embedding + learned position table -> pre-LN layers (causal self-attention,
cross-attention to the encoder output, MLP) -> final LayerNorm; logits are tied to the token
embedding. Used by ``whisper_transcriber`` (the frozen decoder that reads its own transcript);
the SLM never trains it.

One call serves both uses: a whole teacher-forced sequence (``caches=None``), or one
KV-cached decoding step (``caches`` from ``init_caches``, ``cache_index``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention, KVCache, causal_mask
from slm_jax.layers.embeddings import Embed
from slm_jax.layers.mlp import MLP, get_activation
from slm_jax.layers.normalization import LayerNorm


@dataclasses.dataclass(frozen=True)
class WhisperDecoderConfig:
    vocab_size: int = 51865
    d_model: int = 512
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    max_target_positions: int = 448
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"decoder d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        get_activation(self.activation)
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class DecoderCaches(NamedTuple):
    """Per layer: the growing self-attention cache and the fixed cross-attention keys/values."""

    self_attention: tuple[KVCache, ...]
    cross_attention: tuple[KVCache, ...]


class WhisperDecoderLayer(nn.Module):
    config: WhisperDecoderConfig

    def setup(self):
        c = self.config
        attention = lambda name: Attention(  # noqa: E731
            features=c.d_model, num_heads=c.num_heads, head_dim=c.head_dim, q_bias=True, k_bias=False,
            v_bias=True, out_bias=True, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
        )
        norm = lambda name: LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,  # noqa: E731
                                      name=name)
        self.self_attn = attention("self_attn")
        self.encoder_attn = attention("encoder_attn")
        self.self_attn_layer_norm = norm("self_attn_layer_norm")
        self.encoder_attn_layer_norm = norm("encoder_attn_layer_norm")
        self.final_layer_norm = norm("final_layer_norm")
        self.mlp = MLP(hidden_dim=c.ffn_dim, activation=c.activation, use_bias=True, dtype=c.dtype,
                       param_dtype=c.param_dtype, name="mlp")

    def cross_cache(self, memory: jax.Array) -> KVCache:
        return self.encoder_attn.project_kv(memory)

    def __call__(self, x, self_mask, memory, cross_mask, self_cache=None, cross_cache=None, cache_index=None):
        h, self_cache = self.self_attn(self.self_attn_layer_norm(x), mask=self_mask, cache=self_cache,
                                       cache_index=cache_index)
        x = x + h
        h = self.encoder_attn_layer_norm(x)
        if cross_cache is None:
            h, _ = self.encoder_attn(h, memory, mask=cross_mask)
        else:
            h, _ = self.encoder_attn(h, mask=cross_mask, cache=cross_cache, static_kv=True)
        x = x + h
        x = x + self.mlp(self.final_layer_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), self_cache


class WhisperDecoder(nn.Module):
    config: WhisperDecoderConfig

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
                                  name="embed_tokens")
        self.embed_positions = self.param(
            "embed_positions", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (c.max_target_positions, c.d_model), c.param_dtype,
        )
        self.layers = [WhisperDecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.layer_norm = LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                                    name="layer_norm")

    def init_caches(self, memory: jax.Array, max_length: int) -> DecoderCaches:
        """Empty self-attention caches of ``max_length`` slots and the cross-attention keys/values
        of ``memory`` [B, T, D] (computed once per utterance, not once per token)."""
        c = self.config
        empty = KVCache.zeros(memory.shape[0], max_length, c.num_heads, c.head_dim, c.dtype)
        return DecoderCaches(
            tuple(empty for _ in self.layers), tuple(layer.cross_cache(memory) for layer in self.layers)
        )

    def __call__(
        self, tokens: jax.Array, memory: jax.Array, memory_mask: jax.Array,
        caches: DecoderCaches | None = None, cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, DecoderCaches | None]:
        """tokens [B, L] -> final hidden states [B, L, D] (after the last LayerNorm).

        Without ``caches``: the whole sequence, causally masked. With ``caches``: ``tokens`` is one
        step [B, 1] written at slot ``cache_index``, attending to slots up to it.
        """
        c = self.config
        length = tokens.shape[1]
        if caches is None:
            if length > c.max_target_positions:
                raise ValueError(f"WhisperDecoder got {length} tokens; its position table has "
                                 f"{c.max_target_positions}")
            positions = jnp.arange(length)
            self_mask = causal_mask(positions[None], positions[None])
            table = self.embed_positions[:length]
        else:
            positions = cache_index + jnp.arange(length)
            slots = jnp.arange(caches.self_attention[0].k.shape[1])
            self_mask = causal_mask(positions[None], slots[None])
            table = jax.lax.dynamic_slice_in_dim(self.embed_positions, cache_index, length)
        cross_mask = memory_mask[:, None, None, :].astype(bool)  # keys only: [B, 1, 1, T]
        x = self.embed_tokens(tokens) + jnp.asarray(table, c.dtype)[None]
        new_self = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(
                x, self_mask, memory, cross_mask,
                self_cache=None if caches is None else caches.self_attention[i],
                cross_cache=None if caches is None else caches.cross_attention[i],
                cache_index=cache_index,
            )
            new_self.append(cache)
        x = self.layer_norm(x)
        if caches is None:
            return x, None
        return x, DecoderCaches(tuple(new_self), caches.cross_attention)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(hidden)
