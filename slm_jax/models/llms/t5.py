"""T5-family encoder-decoder LLMs in linen: T5 v1.0, T5 v1.1 / Flan-T5, mT5 and mT0.

The SLM paper's LLM is mT0-MT XXL (an mT5-XXL): the encoder reads the prompt EMBEDDINGS
(text | adapted speech | text, each block right-padded), the decoder writes the answer.

T5 specifics, all as in the reference: RMSNorm without bias (pre-norm), unscaled attention
logits (scale 1.0), no absolute positions but a learned relative-position bias per head that
the first layer of each stack owns and every layer of that stack reuses (bidirectional buckets
in the encoder, causal in the decoder, none in cross-attention), and a gated-GELU (v1.1, mT5) or
ReLU (v1.0) MLP. T5 v1.0 ties the output head to the input embeddings and scales the decoder
output by d_model**-0.5 before it; v1.1 / mT5 have a separate head and no scaling.

Encoder positions come from the mask (padding between blocks does not shift later tokens);
decoder positions are slot indices (decoder inputs are contiguous).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention, KVCache, causal_mask
from slm_jax.layers.embeddings import Embed, RelativePositionBias, positions_from_mask
from slm_jax.layers.linears import DenseGeneral
from slm_jax.layers.mlp import MLP
from slm_jax.layers.normalization import RMSNorm
from slm_jax.layers.remat import check_remat_policy, remat_layer

ACTIVATION_AXES = ("batch", "length", "embed")

# feed_forward_proj activation (HF spelling) -> our MLP activation. HF special-cases
# 'gated-gelu' to the tanh approximation ('gelu_new'); a plain 'gelu' is the erf GELU.
_FF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "silu": "silu"}


def parse_feed_forward_proj(name: str) -> tuple[str, bool]:
    """'gated-gelu' -> ('gelu_tanh', True); 'relu' -> ('relu', False)."""
    gated = name.startswith("gated-")
    act = name[len("gated-"):] if gated else name
    if act not in _FF_ACTIVATIONS:
        raise ValueError(
            f"unknown feed_forward_proj {name!r}: expected '<act>' or 'gated-<act>' with act in "
            f"{sorted(_FF_ACTIVATIONS)}"
        )
    if name == "gated-gelu":
        return "gelu_tanh", True
    return _FF_ACTIVATIONS[act], gated


class T5DecoderCache(NamedTuple):
    """Per-layer decoder caches: self-attention (filled step by step) and cross-attention
    (keys/values of the encoder output, computed once by ``T5.init_decoder_cache``)."""

    self_attention: tuple[KVCache, ...]  # [batch, max_decode_length, heads, d_kv]
    cross_attention: tuple[KVCache, ...]  # [batch, encoder_length, heads, d_kv]


@dataclasses.dataclass(frozen=True)
class T5Config:
    # Defaults: T5 v1.1 small.
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # T5.1.1 / mT5 / mT0; 'relu' for T5 v1.0
    tie_word_embeddings: bool = False  # True (T5 v1.0): tied head, decoder output scaled by d_model**-0.5
    layer_norm_epsilon: float = 1e-6
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"
    remat_policy: str = "none"  # 'none' | 'full' | 'dots' (slm_jax.layers.remat)
    attention_implementation: str | None = None  # passed to jax.nn.dot_product_attention

    def __post_init__(self):
        parse_feed_forward_proj(self.feed_forward_proj)
        check_remat_policy(self.remat_policy)
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def mlp_activation(self) -> str:
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def mlp_gated(self) -> bool:
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    def num_params(self) -> int:
        """Parameter count from the shapes alone (matches the initialised tree)."""
        d, inner = self.d_model, self.num_heads * self.d_kv
        attention = 4 * d * inner
        mlp = (3 if self.mlp_gated else 2) * d * self.d_ff
        encoder_layer = attention + mlp + 2 * d
        decoder_layer = 2 * attention + mlp + 3 * d
        relative = 2 * self.relative_attention_num_buckets * self.num_heads
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return (
            embeddings + relative + self.num_layers * encoder_layer + self.num_decoder_layers * decoder_layer + 2 * d
        )


def _preset(**sizes) -> Callable[..., T5Config]:
    def make(**overrides) -> T5Config:
        return T5Config(**{**sizes, **overrides})

    return make


def _published(vocab_size: int, d_model: int, d_ff: int, layers: int, heads: int) -> Callable[..., T5Config]:
    """The released T5 v1.1 / mT5 sizes: d_kv 64 and as many decoder as encoder layers."""
    return _preset(vocab_size=vocab_size, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
                   num_decoder_layers=layers, num_heads=heads)


_T5_VOCAB, _MT5_VOCAB = 32128, 250112
t5_v1_1_small = _published(_T5_VOCAB, d_model=512, d_ff=1024, layers=8, heads=6)
t5_v1_1_base = _published(_T5_VOCAB, d_model=768, d_ff=2048, layers=12, heads=12)
mt5_small = _published(_MT5_VOCAB, d_model=512, d_ff=1024, layers=8, heads=6)
mt5_base = _published(_MT5_VOCAB, d_model=768, d_ff=2048, layers=12, heads=12)
mt5_xl = _published(_MT5_VOCAB, d_model=2048, d_ff=5120, layers=24, heads=32)
mt5_xxl = _published(_MT5_VOCAB, d_model=4096, d_ff=10240, layers=24, heads=64)
mt0_xxl = mt5_xxl  # mT0 = mT5 fine-tuned on xP3: same shapes
t5_tiny = _preset(
    vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16,
)

T5_PRESETS: dict[str, Callable[..., T5Config]] = {
    "t5_v1_1_small": t5_v1_1_small,
    "t5_v1_1_base": t5_v1_1_base,
    "mt5_small": mt5_small,
    "mt5_base": mt5_base,
    "mt5_xl": mt5_xl,
    "mt5_xxl": mt5_xxl,
    "mt0_xxl": mt0_xxl,
    "t5_tiny": t5_tiny,
}


def _norm(cfg: T5Config) -> RMSNorm:
    return RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def _attention(cfg: T5Config) -> Attention:
    return Attention(
        features=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.d_kv, scale=1.0,  # T5: unscaled logits
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, implementation=cfg.attention_implementation,
    )


def _mlp(cfg: T5Config) -> MLP:
    return MLP(hidden_dim=cfg.d_ff, activation=cfg.mlp_activation, gated=cfg.mlp_gated,
               dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def _relative_bias(cfg: T5Config, bidirectional: bool) -> RelativePositionBias:
    return RelativePositionBias(
        num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads, bidirectional=bidirectional, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
    )


def _key_mask(mask: jax.Array) -> jax.Array:
    """[B, K] validity -> [B, 1, 1, K] attention mask (padded queries still see real keys)."""
    return mask[:, None, None, :].astype(bool)


class T5EncoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        self.self_attention_norm = _norm(self.config)
        self.self_attention = _attention(self.config)
        self.mlp_norm = _norm(self.config)
        self.mlp = _mlp(self.config)

    def __call__(self, x: jax.Array, attention_mask: jax.Array, position_bias: jax.Array) -> jax.Array:
        h, _ = self.self_attention(self.self_attention_norm(x), mask=attention_mask, bias=position_bias)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class T5DecoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        self.self_attention_norm = _norm(self.config)
        self.self_attention = _attention(self.config)
        self.cross_attention_norm = _norm(self.config)
        self.cross_attention = _attention(self.config)
        self.mlp_norm = _norm(self.config)
        self.mlp = _mlp(self.config)

    def __call__(
        self, x: jax.Array, self_mask: jax.Array, position_bias: jax.Array,
        encoder_hidden: jax.Array | None, cross_mask: jax.Array,
        self_cache: KVCache | None, cross_cache: KVCache | None, cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, self_cache = self.self_attention(
            self.self_attention_norm(x), mask=self_mask, bias=position_bias, cache=self_cache, cache_index=cache_index
        )
        x = x + h
        h = self.cross_attention_norm(x)
        if cross_cache is not None:
            h, _ = self.cross_attention(h, mask=cross_mask, cache=cross_cache, static_kv=True)
        else:
            h, _ = self.cross_attention(h, encoder_hidden, mask=cross_mask)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES), self_cache


class T5(nn.Module):
    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder_relative_bias = _relative_bias(cfg, bidirectional=True)
        self.encoder_layers = [remat_layer(T5EncoderLayer, cfg.remat_policy)(cfg) for _ in range(cfg.num_layers)]
        self.encoder_final_norm = _norm(cfg)
        self.decoder_relative_bias = _relative_bias(cfg, bidirectional=False)
        self.decoder_layers = [
            remat_layer(T5DecoderLayer, cfg.remat_policy)(cfg) for _ in range(cfg.num_decoder_layers)
        ]
        self.decoder_final_norm = _norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = DenseGeneral(
                cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, param_dtype=cfg.param_dtype
            )

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> embeddings [B, L, d_model] (the table shared by encoder and decoder)."""
        return self.token_embedder(ids)

    def encode(self, inputs_embeds: jax.Array, mask: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Prompt embeddings [B, L, D] + mask [B, L] -> encoder output [B, L, D]."""
        cfg = self.config
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.d_model:
            raise ValueError(
                f"T5.encode expects inputs_embeds [batch, length, {cfg.d_model}], got {inputs_embeds.shape}"
            )
        if mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"T5.encode: mask shape {mask.shape} does not match inputs_embeds {inputs_embeds.shape[:2]}"
            )
        if positions is None:
            positions = positions_from_mask(mask)
        position_bias = self.encoder_relative_bias(positions, positions)  # [B, H, L, L], shared by all layers
        attention_mask = _key_mask(mask)
        x = nn.with_logical_constraint(jnp.asarray(inputs_embeds, cfg.dtype), ACTIVATION_AXES)
        for layer in self.encoder_layers:
            x = layer(x, attention_mask, position_bias)
        return self.encoder_final_norm(x)

    def init_decoder_cache(self, encoder_hidden: jax.Array, max_decode_length: int) -> T5DecoderCache:
        """Empty self-attention caches and the cross-attention keys/values of ``encoder_hidden``."""
        cfg = self.config
        batch = encoder_hidden.shape[0]
        encoder_hidden = jnp.asarray(encoder_hidden, cfg.dtype)
        return T5DecoderCache(
            self_attention=tuple(
                KVCache.zeros(batch, max_decode_length, cfg.num_heads, cfg.d_kv, cfg.dtype)
                for _ in range(cfg.num_decoder_layers)
            ),
            cross_attention=tuple(layer.cross_attention.project_kv(encoder_hidden) for layer in self.decoder_layers),
        )

    def decode(
        self,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_mask: jax.Array | None = None,
        *,
        cache: T5DecoderCache | None = None,
        cache_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, T5DecoderCache | None]:
        """Decoder tokens [B, Ld] -> (final-normed hidden [B, Ld, D], cache).

        Without a cache: teacher forcing over the whole (right-padded) decoder input.
        With ``cache`` (from ``init_decoder_cache``): the tokens sit at slots
        ``cache_index ..`` and see every earlier slot; cross-attention uses the cached encoder
        keys/values, so ``encoder_hidden`` may be None.
        """
        cfg = self.config
        batch, length = decoder_input_tokens.shape
        if decoder_mask is None:
            decoder_mask = jnp.ones((batch, length), jnp.int32)
        if cache is None:
            if encoder_hidden is None:
                raise ValueError("T5.decode needs encoder_hidden when no cache is given")
            query_slots = jnp.arange(length)[None]
            key_slots = query_slots
            self_mask = jnp.logical_and(_key_mask(decoder_mask), causal_mask(query_slots, key_slots))
        else:
            if len(cache.self_attention) != cfg.num_decoder_layers:
                raise ValueError(
                    f"T5.decode: cache has {len(cache.self_attention)} layers, the decoder has {cfg.num_decoder_layers}"
                )
            if cache_index is None:
                raise ValueError("T5.decode: decoding with a cache needs cache_index")
            query_slots = (cache_index + jnp.arange(length))[None]
            key_slots = jnp.arange(cache.self_attention[0].k.shape[1])[None]
            # Decoder inputs are contiguous: every slot up to the query's own is real.
            self_mask = causal_mask(query_slots, key_slots)
        position_bias = self.decoder_relative_bias(query_slots, key_slots)
        cross_mask = _key_mask(encoder_mask)
        x = nn.with_logical_constraint(self.embed(decoder_input_tokens), ACTIVATION_AXES)
        new_self_caches = []
        for i, layer in enumerate(self.decoder_layers):
            x, self_cache = layer(
                x, self_mask, position_bias, encoder_hidden, cross_mask,
                None if cache is None else cache.self_attention[i],
                None if cache is None else cache.cross_attention[i],
                cache_index,
            )
            new_self_caches.append(self_cache)
        x = self.decoder_final_norm(x)
        new_cache = None if cache is None else T5DecoderCache(tuple(new_self_caches), cache.cross_attention)
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder hidden [B, L, D] -> [B, L, vocab]."""
        if self.config.tie_word_embeddings:
            return self.token_embedder.attend(hidden * (self.config.d_model ** -0.5))
        return self.lm_head(hidden)

    def __call__(
        self, inputs_embeds: jax.Array, mask: jax.Array, decoder_input_tokens: jax.Array,
        decoder_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced encoder-decoder forward -> logits [B, Ld, vocab]."""
        encoder_hidden = self.encode(inputs_embeds, mask)
        hidden, _ = self.decode(encoder_hidden, mask, decoder_input_tokens, decoder_mask)
        return self.logits(hidden)
