"""Convolutions whose kernels carry logical axis names (speech encoder front ends).

One ``Conv`` covers every case the encoders need: Whisper's two 1-D convolutions, the
Conformer's 2-D 3x3 subsampling convolutions and its depthwise 1-D convolution
(``feature_group_count = channels``). Kernels use the channels-last layout
[*kernel_size, in_channels / groups, out_channels]; inputs are [batch, *spatial, channels].
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# lax dimension numbers for channels-last data, by number of spatial dims.
_DIMENSION_NUMBERS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
}


class Conv(nn.Module):
    """N-d convolution with explicit zero padding.

    ``padding`` gives (before, after) per spatial dim, so the output length is known in
    Python: ``(length + before + after - kernel) // stride + 1``. ``kernel_axes`` names the
    kernel dims: the spatial dims first, then input and output channels.
    """

    features: int
    kernel_size: Sequence[int]
    kernel_axes: Sequence[str | None]
    strides: Sequence[int] | None = None  # None = 1 everywhere
    padding: Sequence[tuple[int, int]] | None = None  # None = no padding
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = len(self.kernel_size)
        if spatial not in _DIMENSION_NUMBERS:
            raise ValueError(f"Conv supports 1 or 2 spatial dims, got kernel_size {tuple(self.kernel_size)}")
        if x.ndim != spatial + 2:
            raise ValueError(f"a {spatial}-d convolution needs input [batch, *spatial, channels], got shape {x.shape}")
        in_channels = x.shape[-1]
        if in_channels % self.feature_group_count or self.features % self.feature_group_count:
            raise ValueError(
                f"feature_group_count {self.feature_group_count} must divide both the input channels "
                f"({in_channels}) and the output channels ({self.features})"
            )
        kernel_shape = (*self.kernel_size, in_channels // self.feature_group_count, self.features)
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"kernel_axes {tuple(self.kernel_axes)} do not match kernel shape {kernel_shape}")

        def init(key, shape, dtype):
            # fan-in = receptive field x input channels per group, as for a dense layer.
            flat = (int(np.prod(shape[:-1])), shape[-1])
            return self.kernel_init(key, flat, dtype).reshape(shape)

        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)), kernel_shape, self.param_dtype
        )
        strides = tuple(self.strides) if self.strides is not None else (1,) * spatial
        padding = tuple(tuple(p) for p in self.padding) if self.padding is not None else ((0, 0),) * spatial
        y = jax.lax.conv_general_dilated(
            jnp.asarray(x, self.dtype),
            jnp.asarray(kernel, self.dtype),
            window_strides=strides,
            padding=padding,
            dimension_numbers=_DIMENSION_NUMBERS[spatial],
            feature_group_count=self.feature_group_count,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, (self.kernel_axes[-1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y


def conv_output_length(length, kernel_size: int, stride: int, padding: tuple[int, int]):
    """Output length of a padded strided convolution; works on ints and integer arrays."""
    return (length + padding[0] + padding[1] - kernel_size) // stride + 1


def subsample_mask(mask: jax.Array, stride: int) -> jax.Array:
    """Frame mask after a centred ('same'-padded) convolution with this stride along axis 1.

    Output frame j is centred on input frame j * stride, so it is real exactly when that frame
    is. For right-padded masks this equals ``arange(T') < (length - 1) // stride + 1``.
    """
    return mask[:, ::stride]
