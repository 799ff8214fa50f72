"""Multi-head / grouped-query attention with an optional preallocated KV cache.

One implementation serves every model: Whisper and Conformer encoders (no cache), the T5
encoder/decoder (relative bias, unscaled logits, cross-attention) and Llama (RoPE, GQA).

Caching is functional: a ``KVCache`` is a pair of arrays [batch, max_length, kv_heads, head_dim]
passed in and returned, so decoding loops can live inside one ``jax.lax.while_loop`` and beam
search can reorder caches with a gather.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.embeddings import apply_rotary
from slm_jax.layers.linears import DenseGeneral


class KVCache(NamedTuple):
    k: jax.Array  # [batch, max_length, kv_heads, head_dim]
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_length, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def padding_mask(q_mask: jax.Array, k_mask: jax.Array) -> jax.Array:
    """[B, Q] x [B, K] token masks -> [B, 1, Q, K] attention mask."""
    return jnp.logical_and(q_mask[:, None, :, None].astype(bool), k_mask[:, None, None, :].astype(bool))


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Query i may see key j when position(j) <= position(i). [B, Q], [B, K] -> [B, 1, Q, K]."""
    return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None, bias: jax.Array | None,
    scale: float, implementation: str | None = None, causal_block: int | None = None, query_offset: int = 0,
) -> jax.Array:
    """Scaled dot-product attention. q [B,Q,N,D], k/v [B,K,Nkv,D], mask bool [B,1|N,Q,K].

    Goes through ``jax.nn.dot_product_attention`` (XLA on CPU/TPU, cuDNN flash attention on GPU
    when ``implementation='cudnn'``), which handles grouped-query attention natively.

    ``causal_block``: the caller promises causal self-attention by slot: query i sits in key
    slot ``query_offset + i`` (0 without a cache; a prefill's static cache index with one) and
    ``mask`` hides every later key slot. Queries then go in blocks of this many and each block
    attends only to the keys up to its own last slot. XLA computes and differentiates
    the whole masked score matrix otherwise; skipping its upper triangle is what the `scaling`
    benchmark's "default vs unblocked causal attention" rows measure. Rows with at least one
    visible key come out the same; a row with none (left padding) is undefined either way.
    """
    if bias is not None:
        bias = bias.astype(q.dtype)
    if mask is not None and mask.shape[1] not in (1, q.shape[2]):
        raise ValueError(f"mask heads dim {mask.shape[1]} must be 1 or {q.shape[2]}")
    length = q.shape[1]
    if causal_block is None or implementation == "cudnn" or length <= causal_block:
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation
        )
    if k.shape[1] < query_offset + length:
        raise ValueError(f"causal_block: {length} queries from key slot {query_offset} need at least "
                         f"{query_offset + length} keys, got {k.shape[1]}")
    blocks = []
    for start in range(0, length, causal_block):  # static shapes: one piece per block, unrolled
        end = min(start + causal_block, length)
        visible = query_offset + end
        piece = lambda a: None if a is None else a[..., start:end, :visible]  # noqa: E731
        blocks.append(jax.nn.dot_product_attention(
            q[:, start:end], k[:, :visible], v[:, :visible], bias=piece(bias), mask=piece(mask), scale=scale,
            implementation=implementation,
        ))
    return jnp.concatenate(blocks, axis=1)


class Attention(nn.Module):
    features: int  # model width (output of the out projection)
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # None = num_heads (no GQA)
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    out_bias: bool = False
    scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1.0
    rope_theta: float | None = None  # None = no rotary embedding
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    implementation: str | None = None
    # Set only by callers whose self-attention mask is causal by slot (decoders): see
    # ``attend``. Used without a cache and for a cache written from a static index (prefill);
    # token-by-token decoding (a traced index) and cross-attention never use it.
    causal_block: int | None = None

    def setup(self):
        kv_heads = self.num_kv_heads or self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        self.query = DenseGeneral((self.num_heads, self.head_dim), ("embed", "heads", "kv"), use_bias=self.q_bias, **kw)
        self.key = DenseGeneral((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), use_bias=self.k_bias, **kw)
        self.value = DenseGeneral((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), use_bias=self.v_bias, **kw)
        self.out = DenseGeneral(
            self.features, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.out_bias, **kw
        )

    def project_kv(self, x: jax.Array, positions: jax.Array | None = None) -> KVCache:
        """Keys/values of ``x`` (rotated when RoPE is on): fills a cross-attention cache once."""
        k = self.key(x)
        v = self.value(x)
        if self.rope_theta is not None:
            k = apply_rotary(k, positions, self.rope_theta)
        return KVCache(k, v)

    def __call__(
        self,
        x: jax.Array,
        kv_input: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        static_kv: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns (output [B, Q, embed], updated cache or None).

        - self-attention: ``kv_input=None``; ``positions`` [B, Q] drive RoPE.
        - cross-attention: ``kv_input`` = memory [B, K, embed].
        - decoding: ``cache`` with ``cache_index`` writes this step's keys/values at
          ``cache_index`` and attends over the whole cache (``mask`` covers [B,1,Q,max_length]);
          ``static_kv=True`` uses ``cache`` as precomputed keys/values (cross-attention).
        """
        q = self.query(x)
        if self.rope_theta is not None:
            q = apply_rotary(q, positions, self.rope_theta)
        if static_kv:
            if cache is None:
                raise ValueError("static_kv=True needs a precomputed cache")
            k, v, new_cache = cache.k, cache.v, cache
        else:
            new = self.project_kv(x if kv_input is None else kv_input, positions)
            if cache is None:
                k, v, new_cache = new.k, new.v, None
            else:
                if cache_index is None:
                    raise ValueError("a self-attention cache needs cache_index")
                start = (0, cache_index, 0, 0)
                k = jax.lax.dynamic_update_slice(cache.k, new.k.astype(cache.k.dtype), start)
                v = jax.lax.dynamic_update_slice(cache.v, new.v.astype(cache.v.dtype), start)
                new_cache = KVCache(k, v)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        # Where this chunk's queries sit among the keys, when that is known while tracing.
        query_offset = 0 if cache is None else (cache_index if isinstance(cache_index, int) else None)
        blockable = kv_input is None and not static_kv and query_offset is not None
        y = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, bias=bias, scale=scale,
                   implementation=self.implementation, causal_block=self.causal_block if blockable else None,
                   query_offset=query_offset or 0)
        return self.out(y), new_cache
