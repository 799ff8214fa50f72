"""Whisper's audio encoder in linen, numerically equal to Hugging Face's ``WhisperEncoder``.

conv1 (k=3, pad 1) + GELU -> conv2 (k=3, stride 2, pad 1) + GELU -> + position table ->
pre-LN transformer layers -> final LayerNorm.

Two deliberate extensions over the reference, both behind config flags:

- Inputs shorter than 30 s run without padding to 3000 frames: the position table is sliced
  to the T' = ceil(T / 2) output frames.
- ``mask_padding=True`` (the default, for training the SLM) makes padded frames inert: the
  convolutions read zeros at padded frames, attention ignores padded keys and padded outputs
  are zero, so an utterance encodes the same alone or padded in a batch. The reference has no
  mask at all (every frame, padding included, is attended to); ``mask_padding=False``
  reproduces that exactly for parity with Hugging Face / OpenAI checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention
from slm_jax.layers.convolution import Conv, subsample_mask
from slm_jax.layers.embeddings import sinusoidal_positions
from slm_jax.layers.mlp import MLP, get_activation
from slm_jax.layers.normalization import LayerNorm

# Logical names of activations flowing between layers.
ACTIVATION_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    num_mel_bins: int = 80
    d_model: int = 512
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    max_source_positions: int = 1500  # encoder output frames in 30 s (3000 input frames)
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"  # of the feed-forward layers; the two convolutions always use erf GELU
    mask_padding: bool = True  # False = attend to padding like the reference (exact HF parity)
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"
    attention_implementation: str | None = None  # passed to jax.nn.dot_product_attention

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even for the sinusoidal position table")
        get_activation(self.activation)  # fails early, naming the known activations
        # Accept "bfloat16", jnp.bfloat16, ...; store one canonical (hashable) numpy dtype.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def output_dim(self) -> int:
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def max_frames(self) -> int:
        """The longest input (in 10 ms frames) the position table covers: 3000 = 30 s."""
        return 2 * self.max_source_positions

    def frames_out(self, num_frames):
        """Encoder output frames for ``num_frames`` input frames (int or integer array)."""
        return (num_frames - 1) // 2 + 1


def _preset(**sizes) -> Callable[..., WhisperEncoderConfig]:
    def make(**overrides) -> WhisperEncoderConfig:
        return WhisperEncoderConfig(**{**sizes, **overrides})

    return make


# OpenAI's encoder sizes. large is large-v1/v2; large-v3 is the same with num_mel_bins=128.
whisper_tiny = _preset(d_model=384, num_layers=4, num_heads=6, ffn_dim=1536)
whisper_base = _preset(d_model=512, num_layers=6, num_heads=8, ffn_dim=2048)
whisper_small = _preset(d_model=768, num_layers=12, num_heads=12, ffn_dim=3072)
whisper_medium = _preset(d_model=1024, num_layers=24, num_heads=16, ffn_dim=4096)
whisper_large = _preset(d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120)

WHISPER_PRESETS: dict[str, Callable[..., WhisperEncoderConfig]] = {
    "tiny": whisper_tiny,
    "base": whisper_base,
    "small": whisper_small,
    "medium": whisper_medium,
    "large": whisper_large,
}


def check_speech_inputs(
    features: jax.Array, mask: jax.Array | None, num_mel_bins: int, encoder_name: str
) -> tuple[jax.Array, jax.Array]:
    """Validates the encoder interface ([B, T, mels] features, [B, T] mask); fills a None mask."""
    if features.ndim != 3 or features.shape[-1] != num_mel_bins:
        raise ValueError(
            f"{encoder_name} expects log-mel features [batch, frames, {num_mel_bins}], got shape {features.shape}"
        )
    if mask is None:
        mask = jnp.ones(features.shape[:2], jnp.int32)
    elif mask.shape != features.shape[:2]:
        raise ValueError(f"{encoder_name}: mask shape {mask.shape} does not match features {features.shape[:2]}")
    return features, mask


def zero_padding(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Zeroes the frames where mask == 0 (x [B, T, C], mask [B, T])."""
    return x * mask[..., None].astype(x.dtype)


class WhisperEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + MLP(LN(x))."""

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        norm = lambda name: LayerNorm(  # noqa: E731
            epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        h = norm("self_attn_layer_norm")(x)
        h, _ = Attention(
            features=cfg.d_model,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            q_bias=True,
            k_bias=False,  # Whisper's key projection has no bias
            v_bias=True,
            out_bias=True,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            implementation=cfg.attention_implementation,
            name="self_attn",
        )(h, mask=attention_mask)
        x = x + h
        h = norm("final_layer_norm")(x)
        h = MLP(
            hidden_dim=cfg.ffn_dim,
            activation=cfg.activation,
            use_bias=True,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlp",
        )(h)
        return nn.with_logical_constraint(x + h, ACTIVATION_AXES)


class WhisperEncoder(nn.Module):
    """log-mel [B, T, mels] + mask [B, T] -> (hidden [B, ceil(T/2), d_model], mask [B, ceil(T/2)])."""

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        features, mask = check_speech_inputs(features, mask, cfg.num_mel_bins, "WhisperEncoder")
        num_frames = features.shape[1]
        if num_frames > cfg.max_frames:
            raise ValueError(
                f"WhisperEncoder input has {num_frames} frames but the position table "
                f"({cfg.max_source_positions} positions) covers at most {cfg.max_frames} frames "
                f"({cfg.max_frames / 100:.0f} s at a 10 ms hop); split the audio into shorter chunks"
            )
        conv = lambda name, stride, axes: Conv(  # noqa: E731
            features=cfg.d_model,
            kernel_size=(3,),
            kernel_axes=axes,
            strides=(stride,),
            padding=((1, 1),),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name=name,
        )
        gelu = get_activation("gelu")
        x = jnp.asarray(features, cfg.dtype)
        if cfg.mask_padding:
            # Zeros at padded frames look exactly like the convolution's own zero padding, so
            # the last real frames see the same window alone or padded in a batch.
            x = zero_padding(x, mask)
        x = gelu(conv("conv1", 1, ("conv_kernel", "mel", "embed"))(x))
        if cfg.mask_padding:
            x = zero_padding(x, mask)  # same reason, for conv2's window
        x = gelu(conv("conv2", 2, ("conv_kernel", None, "embed"))(x))
        out_mask = subsample_mask(mask, 2)

        table = self.param(
            "embed_positions",
            nn.with_logical_partitioning(
                lambda key, shape, dtype: jnp.asarray(sinusoidal_positions(*shape), dtype), ("length", "embed")
            ),
            (cfg.max_source_positions, cfg.d_model),
            cfg.param_dtype,
        )
        x = x + jnp.asarray(table[: x.shape[1]], cfg.dtype)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        # Key-only mask [B, 1, 1, T']: padded queries still attend to real keys, so no softmax
        # row is empty; their outputs are zeroed at the end.
        attention_mask = out_mask[:, None, None, :].astype(bool) if cfg.mask_padding else None
        for i in range(cfg.num_layers):
            x = WhisperEncoderLayer(cfg, name=f"layers_{i}")(x, attention_mask)
        x = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="layer_norm")(x)
        if cfg.mask_padding:
            x = zero_padding(x, out_mask)
        return x, out_mask
