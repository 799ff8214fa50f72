"""Token embeddings and positional schemes: sinusoidal (Whisper), rotary (Llama, Conformer),
and T5 relative position buckets.

Positions are always passed in explicitly (computed from masks as ``cumsum(mask) - 1``) so that
padding placed between the blocks of a prompt (text | speech | text) does not shift the
positions of the real tokens after it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Embed(nn.Module):
    """A token embedding table [vocab, embed]; ``attend`` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Any = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", jnp.asarray(x, self.dtype), jnp.asarray(self.embedding, self.dtype))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """0-based positions of the real (mask=1) tokens; padding repeats its left neighbour's."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def sinusoidal_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's table: [sin(t * inv_timescale) | cos(t * inv_timescale)] of shape [length, channels]."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even channel count, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding in the Hugging Face 'rotate half' layout.

    x: [batch, length, heads, head_dim]; positions: [batch, length].
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, D]
    x32 = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucketing of (key_position - query_position): exact for short, log-spaced for long."""
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Guard log(0): those entries take the is_small branch anyway.
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias: a learned scalar per (bucket, head)."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """q_positions [B, Q], k_positions [B, K] -> bias [B, heads, Q, K]."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        relative = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=0)  # [B, Q, K, H]
        return jnp.transpose(bias, (0, 3, 1, 2))
