"""Feed-forward blocks: plain (Whisper, Conformer) and gated (T5.1.1 gated-GELU, Llama SwiGLU)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.linears import DenseGeneral

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # erf GELU (Whisper, HF "gelu")
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # T5.1.1 / mT5 "gelu_new"
    "silu": nn.silu,  # Llama SwiGLU, Conformer Swish
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """out = W_o( act(W_i x) [* W_gate x] ).

    With ``gated=True`` the parameters are ``wi_0`` (activated branch), ``wi_1`` (linear branch)
    and ``wo`` (T5X naming; Llama's gate/up/down map to wi_0/wi_1/wo).
    """

    hidden_dim: int
    activation: str = "gelu"
    gated: bool = False
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        dense = lambda feats, axes, name: DenseGeneral(  # noqa: E731
            feats, axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name=name,
        )
        if self.gated:
            h = act(dense(self.hidden_dim, ("embed", "mlp"), "wi_0")(x)) * dense(self.hidden_dim, ("embed", "mlp"), "wi_1")(x)
        else:
            h = act(dense(self.hidden_dim, ("embed", "mlp"), "wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)
