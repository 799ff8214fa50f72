"""Dense layers whose kernels carry logical axis names."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
DType = Any


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class DenseGeneral(nn.Module):
    """y = x . W (+ b), contracting ``axis`` of x into output ``features`` (int or tuple).

    ``kernel_axes`` names the kernel dimensions: contracted input dims first, then the output
    dims, e.g. ('embed', 'heads', 'kv') for a query projection.
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _as_tuple(self.features)
        axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        kernel_shape = in_shape + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}")

        def init(key, shape, dtype):
            # Initialise as a 2-D matrix (fan-in = all contracted dims), then reshape.
            flat = (int(np.prod(in_shape)), int(np.prod(features)))
            return self.kernel_init(key, flat, dtype).reshape(shape)

        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)), kernel_shape, self.param_dtype
        )
        kernel = jnp.asarray(kernel, self.dtype)
        x = jnp.asarray(x, self.dtype)
        y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, tuple(self.kernel_axes[len(axis):])),
                features,
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y
