"""The trainable adapter: the only part of an SLM that learns.

speech encoder output [B, T, D_enc] --uniform subsampling (r)--> [B, T/r, *]
  --input projection--> N pre-LN transformer layers --LayerNorm + projection--> [B, T/r, D_llm]

The paper finds the adapter saturates at about 2 layers with 4x subsampling, and keeps it at
about 1% of all parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.layers.attention import Attention, padding_mask
from slm_jax.layers.embeddings import positions_from_mask
from slm_jax.layers.linears import DenseGeneral
from slm_jax.layers.mlp import MLP
from slm_jax.layers.normalization import LayerNorm

SUBSAMPLING_MODES = ("pick", "stack", "average")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    output_dim: int  # the LLM's embedding width
    d_model: int = 256
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 1024
    subsample_rate: int = 4
    # 'pick': keep every r-th frame (the paper's uniform subsampling, the default);
    # 'stack': concatenate r neighbouring frames; 'average': mean over r frames.
    subsample_mode: str = "pick"
    rope_theta: float | None = 10000.0
    # Zeros for the output projection: the adapter starts as "add nothing" (used where its output
    # is added to something meaningful, see SLM.adapt).
    zero_init_output: bool = False
    activation: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.subsample_mode not in SUBSAMPLING_MODES:
            raise ValueError(f"subsample_mode must be one of {SUBSAMPLING_MODES}, got {self.subsample_mode!r}")
        if self.subsample_rate < 1:
            raise ValueError(f"subsample_rate must be >= 1, got {self.subsample_rate}")
        if self.d_model % self.num_heads:
            raise ValueError(f"adapter d_model {self.d_model} is not divisible by num_heads {self.num_heads}")

    def frames_out(self, frames_in: int) -> int:
        return -(-frames_in // self.subsample_rate)


def uniform_subsample(x: jax.Array, mask: jax.Array, rate: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """Shortens time by ``rate``: [B, T, D] -> [B, ceil(T/rate), D or rate*D].

    An output frame is real when the first input frame of its group is real, in every mode, so
    the output mask does not depend on the mode. Padded input frames are zeroed first so they
    never leak into 'stack' or 'average' groups.
    """
    if rate == 1:
        return x, mask
    b, t, d = x.shape
    x = x * mask[..., None].astype(x.dtype)
    out_mask = mask[:, ::rate]
    if mode == "pick":
        return x[:, ::rate], out_mask
    pad = (-t) % rate
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    groups = x.reshape(b, (t + pad) // rate, rate, d)
    if mode == "stack":
        return groups.reshape(b, (t + pad) // rate, rate * d), out_mask
    counts = jnp.pad(mask, ((0, 0), (0, pad))).reshape(b, -1, rate).sum(-1, keepdims=True)
    return groups.sum(2) / jnp.maximum(counts, 1).astype(x.dtype), out_mask


class AdapterLayer(nn.Module):
    config: AdapterConfig

    @nn.compact
    def __call__(self, x, attn_mask, positions):
        c = self.config
        h = LayerNorm(dtype=c.dtype, param_dtype=c.param_dtype, name="attention_norm")(x)
        h, _ = Attention(
            features=c.d_model, num_heads=c.num_heads, head_dim=c.d_model // c.num_heads,
            q_bias=True, v_bias=True, out_bias=True, rope_theta=c.rope_theta,
            dtype=c.dtype, param_dtype=c.param_dtype, name="attention",
        )(h, mask=attn_mask, positions=positions)
        x = x + h
        h = LayerNorm(dtype=c.dtype, param_dtype=c.param_dtype, name="mlp_norm")(x)
        h = MLP(c.ffn_dim, c.activation, use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")(h)
        return nn.with_logical_constraint(x + h, ("batch", "length", "embed"))


class Adapter(nn.Module):
    config: AdapterConfig

    @nn.compact
    def __call__(self, speech: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        x, mask = uniform_subsample(speech, mask, c.subsample_rate, c.subsample_mode)
        x = DenseGeneral(c.d_model, ("mel", "embed"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, name="input_projection")(x)
        positions = positions_from_mask(mask)
        attn_mask = padding_mask(mask, mask)
        for i in range(c.num_layers):
            x = AdapterLayer(c, name=f"layer_{i}")(x, attn_mask, positions)
        x = LayerNorm(dtype=c.dtype, param_dtype=c.param_dtype, name="output_norm")(x)
        init = {"kernel_init": nn.initializers.zeros} if c.zero_init_output else {}
        x = DenseGeneral(c.output_dim, ("mlp", "embed"), use_bias=True, dtype=c.dtype,
                         param_dtype=c.param_dtype, name="output_projection", **init)(x)
        # Padded frames become exact zeros: they are masked downstream, and zeros keep the
        # LLM input independent of whatever the padding computed.
        return x * mask[..., None].astype(x.dtype), mask
