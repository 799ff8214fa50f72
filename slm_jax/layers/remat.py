"""Activation rematerialisation (gradient checkpointing) of whole transformer layers.

The frozen LLM still sits on the gradient path of the adapter (the loss is backpropagated
through it to the speech embeddings), so its activations dominate training memory at scale.
"""

from __future__ import annotations

import flax.linen as nn
import jax

# 'none': keep every activation; 'full': keep only layer inputs, recompute the rest in the
# backward pass; 'dots': keep the weight matmul outputs (no batch dims), recompute the cheap
# element-wise work and attention.
REMAT_POLICIES = ("none", "full", "dots")


def check_remat_policy(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; known: {REMAT_POLICIES}")


def remat_layer(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``layer_cls`` wrapped for ``policy``; its parameter tree is unchanged."""
    check_remat_policy(policy)
    if policy == "none":
        return layer_cls
    checkpoint_policy = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(layer_cls, policy=checkpoint_policy)
