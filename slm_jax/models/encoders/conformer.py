"""A USM-like Conformer speech encoder (Gulati et al. 2020; USM, Zhang et al. 2023) in linen.

log-mel [B, T, mels] -> two 3x3 stride-2 conv2d + ReLU (4x time subsampling) -> linear to
d_model -> Conformer blocks -> [B, ceil(ceil(T/2)/2), d_model].

Each block:  x + 1/2 FFN(LN x)  ->  x + MHSA(LN x) (rotary positions)  ->  x + Conv(x)
             ->  x + 1/2 FFN(LN x)  ->  LN
Conv module: LN -> pointwise (d -> 2d) -> GLU -> depthwise conv -> LN -> swish -> pointwise.

Choices that differ from the original paper, on purpose:
- The norm after the depthwise conv is a LayerNorm, not BatchNorm: no batch statistics, so a
  frame's output never depends on the other utterances (or the padding) in its batch.
- Padding is inert: padded frames are zeroed before every convolution whose window can reach
  them (the two subsampling convs and each depthwise conv) and masked out of attention, so an
  utterance encodes identically alone or padded in a batch.
- No dropout (the encoder is frozen in the SLM).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention
from slm_jax.layers.convolution import Conv, conv_output_length, subsample_mask
from slm_jax.layers.embeddings import positions_from_mask
from slm_jax.layers.linears import DenseGeneral
from slm_jax.layers.mlp import MLP
from slm_jax.layers.normalization import LayerNorm
from slm_jax.models.encoders.whisper import ACTIVATION_AXES, check_speech_inputs, zero_padding

POSITION_SCHEMES = ("rotary", "none")
# Both subsampling convs: kernel 3, stride 2, one zero frame of padding on each side.
_SUBSAMPLE_KERNEL, _SUBSAMPLE_STRIDE, _SUBSAMPLE_PADDING = 3, 2, (1, 1)


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
    num_mel_bins: int = 80
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 1024
    conv_kernel_size: int = 15  # depthwise conv width (odd, centred)
    subsampling_channels: int = 64  # channels of the two conv2d subsampling layers
    positions: str = "rotary"  # 'rotary' (RoPE on q/k) or 'none' (the conv module alone gives order)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"
    attention_implementation: str | None = None  # passed to jax.nn.dot_product_attention

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd for a centred depthwise conv, got {self.conv_kernel_size}")
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {self.positions!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def output_dim(self) -> int:
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def subsampled_mel_bins(self) -> int:
        """Frequency bins left after the two stride-2 convs (80 -> 40 -> 20)."""
        return self.frames_out(self.num_mel_bins)

    def frames_out(self, num_frames):
        """Output frames for ``num_frames`` input frames (int or integer array): ceil(ceil(T/2)/2)."""
        for _ in range(2):
            num_frames = conv_output_length(num_frames, _SUBSAMPLE_KERNEL, _SUBSAMPLE_STRIDE, _SUBSAMPLE_PADDING)
        return num_frames


def conformer_tiny(**overrides) -> ConformerConfig:
    """About 340K parameters: for CPU tests."""
    sizes = dict(d_model=64, num_layers=3, num_heads=4, ffn_dim=256, conv_kernel_size=15, subsampling_channels=32)
    return ConformerConfig(**{**sizes, **overrides})


def conformer_usm_2b(**overrides) -> ConformerConfig:
    """USM-sized encoder (~1.76B parameters): d 1536, 32 layers, 16 heads, FFN 6144.

    The depthwise kernel width and the subsampling channels are free choices here; together
    they change the count by well under 1%.
    """
    sizes = dict(
        d_model=1536, num_layers=32, num_heads=16, ffn_dim=6144, conv_kernel_size=5, subsampling_channels=128
    )
    return ConformerConfig(**{**sizes, **overrides})


CONFORMER_PRESETS = {"tiny": conformer_tiny, "usm_2b": conformer_usm_2b}


class ConvolutionModule(nn.Module):
    """LN -> pointwise (d -> 2d) -> GLU -> depthwise conv -> LN -> swish -> pointwise (d -> d)."""

    config: ConformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = LayerNorm(epsilon=cfg.layer_norm_eps, name="norm", **kw)(x)
        h = DenseGeneral(2 * cfg.d_model, ("embed", "mlp"), use_bias=False, name="pointwise_in", **kw)(h)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * nn.sigmoid(gate)  # GLU
        # The depthwise window of the last real frames reaches into the padding: zeros there
        # match the conv's own zero padding when the utterance is alone.
        h = zero_padding(h, mask)
        half = (cfg.conv_kernel_size - 1) // 2
        h = Conv(
            features=cfg.d_model,
            kernel_size=(cfg.conv_kernel_size,),
            kernel_axes=("conv_kernel", None, "mlp"),
            padding=((half, half),),
            feature_group_count=cfg.d_model,
            use_bias=False,
            name="depthwise",
            **kw,
        )(h)
        h = LayerNorm(epsilon=cfg.layer_norm_eps, name="depthwise_norm", **kw)(h)
        h = nn.silu(h)
        return DenseGeneral(cfg.d_model, ("mlp", "embed"), use_bias=False, name="pointwise_out", **kw)(h)


class ConformerBlock(nn.Module):
    config: ConformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, d], mask [B, T] (1 = real), positions [B, T] -> [B, T, d]."""
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        norm = lambda name: LayerNorm(epsilon=cfg.layer_norm_eps, name=name, **kw)  # noqa: E731
        ffn = lambda name: MLP(hidden_dim=cfg.ffn_dim, activation="silu", use_bias=True, name=name, **kw)  # noqa: E731

        x = x + 0.5 * ffn("ffn1")(norm("ffn1_norm")(x))
        h, _ = Attention(
            features=cfg.d_model,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            q_bias=True,
            k_bias=True,
            v_bias=True,
            out_bias=True,
            rope_theta=cfg.rope_theta if cfg.positions == "rotary" else None,
            implementation=cfg.attention_implementation,
            name="self_attn",
            **kw,
        )(norm("self_attn_norm")(x), mask=mask[:, None, None, :].astype(bool), positions=positions)
        x = x + h
        x = x + ConvolutionModule(cfg, name="conv_module")(x, mask)
        x = x + 0.5 * ffn("ffn2")(norm("ffn2_norm")(x))
        return nn.with_logical_constraint(norm("final_norm")(x), ACTIVATION_AXES)


class Conformer(nn.Module):
    """log-mel [B, T, mels] + mask [B, T] -> (hidden [B, T', d_model], mask [B, T']), T' = frames_out(T)."""

    config: ConformerConfig

    @nn.compact
    def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        features, mask = check_speech_inputs(features, mask, cfg.num_mel_bins, "Conformer")
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        subsample = lambda name: Conv(  # noqa: E731
            features=cfg.subsampling_channels,
            kernel_size=(_SUBSAMPLE_KERNEL, _SUBSAMPLE_KERNEL),
            kernel_axes=("conv_kernel", None, None, None),
            strides=(_SUBSAMPLE_STRIDE, _SUBSAMPLE_STRIDE),
            padding=(_SUBSAMPLE_PADDING, _SUBSAMPLE_PADDING),
            name=name,
            **kw,
        )
        # [B, T, mels] -> an image [B, time, freq, 1]; zeroed padding frames look like the
        # convs' own zero padding, so real frames near the end see the same window when alone.
        x = zero_padding(jnp.asarray(features, cfg.dtype), mask)[..., None]
        x = nn.relu(subsample("subsample_conv1")(x))
        mask = subsample_mask(mask, _SUBSAMPLE_STRIDE)
        x = x * mask[:, :, None, None].astype(x.dtype)
        x = nn.relu(subsample("subsample_conv2")(x))
        mask = subsample_mask(mask, _SUBSAMPLE_STRIDE)
        x = DenseGeneral(  # [B, T', freq', channels] -> [B, T', d_model]
            cfg.d_model, ("mel", None, "embed"), axis=(-2, -1), use_bias=True, name="subsample_proj", **kw
        )(x)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        positions = positions_from_mask(mask)
        for i in range(cfg.num_layers):
            x = ConformerBlock(cfg, name=f"layers_{i}")(x, mask, positions)
        return zero_padding(x, mask), mask
