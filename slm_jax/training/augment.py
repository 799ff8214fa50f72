"""Masking of the frozen speech encoder's output during training (SpecAugment on features).

The adapter is trained on synthetic speech; zeroing random spans of encoder frames and random
bands of encoder channels keeps it from relying on any one frame or channel of one synthesiser's
sound. It acts on the encoder *output*, so it works the same when that output was cached offline
(``encoder_cache``). Training only: eval, inference and the alignment vocabulary never mask.

The masks of a step come from ``(seed, step)`` alone, so a resumed run masks exactly as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SpeechMasking:
    time_masks: int = 2  # spans of frames zeroed per utterance
    max_time_frames: int = 20  # longest span (Whisper: 50 frames per second, so 0.4 s)
    max_time_fraction: float = 0.2  # and never more than this share of an utterance per span
    feature_masks: int = 2  # bands of channels zeroed per utterance
    max_features: int = 48  # widest band (Whisper-base has 512 channels)

    def __post_init__(self):
        for name in ("time_masks", "max_time_frames", "feature_masks", "max_features"):
            if getattr(self, name) < 0:
                raise ValueError(f"SpeechMasking.{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.max_time_fraction <= 1.0:
            raise ValueError(f"SpeechMasking.max_time_fraction must be in [0, 1], got {self.max_time_fraction}")


def _spans(rng: jax.Array, count: int, max_width: jax.Array, length: jax.Array, size: int) -> jax.Array:
    """[size] bool: True inside ``count`` random spans of width < ``max_width`` within ``length``."""
    width_rng, start_rng = jax.random.split(rng)
    widths = jnp.floor(jax.random.uniform(width_rng, (count,)) * max_width).astype(jnp.int32)
    starts = jnp.floor(jax.random.uniform(start_rng, (count,)) * jnp.maximum(length - widths, 1)).astype(jnp.int32)
    index = jnp.arange(size)[None, :]
    return jnp.any((index >= starts[:, None]) & (index < (starts + widths)[:, None]), axis=0)


def mask_speech(rng: jax.Array, hidden: jax.Array, mask: jax.Array, config: SpeechMasking) -> jax.Array:
    """``hidden`` [B, T, D] with random time spans and channel bands of each utterance set to zero.
    ``mask`` [B, T] marks real frames: spans fall inside each utterance's own length."""
    b, t, d = hidden.shape
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
    time_rng, feature_rng = jax.random.split(rng)

    def one(time_key, feature_key, length):
        max_width = jnp.minimum(config.max_time_frames, jnp.floor(config.max_time_fraction * length)) + 1
        zero_time = _spans(time_key, config.time_masks, max_width, length, t) if config.time_masks else jnp.zeros(t, bool)
        zero_feature = (_spans(feature_key, config.feature_masks, jnp.asarray(config.max_features + 1), jnp.asarray(d), d)
                        if config.feature_masks else jnp.zeros(d, bool))
        return zero_time[:, None] | zero_feature[None, :]

    zero = jax.vmap(one)(jax.random.split(time_rng, b), jax.random.split(feature_rng, b), lengths)
    return jnp.where(zero, jnp.zeros((), hidden.dtype), hidden)
