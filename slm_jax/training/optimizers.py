"""The adapter's optimizer and learning-rate schedule (T5X keeps them apart from the trainer too)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    total_steps: int = 10_000,
    end_learning_rate_fraction: float = 0.1,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.98,
    name: str = "adamw",
    restarts: Sequence[int] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW or Adafactor with linear warm-up and cosine decay, after global-norm clipping.

    Adafactor (T5X's default) factors the second moment into row and column statistics, so its
    state is a small fraction of AdamW's two full moments: the choice for paper-scale adapters.
    ``restarts``: steps where the schedule starts over (warm-up and cosine decay over the steps
    up to the next restart), e.g. where a run switches objective.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
    bounds = [0, *restarts, total_steps]
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(f"schedule restarts {list(restarts)} must increase strictly inside (0, {total_steps})")

    def phase(length: int) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=max(1, min(warmup_steps, length - 1)),
            decay_steps=max(length, 2),
            end_value=learning_rate * end_learning_rate_fraction,
        )

    phases = [phase(e - b) for b, e in zip(bounds, bounds[1:])]
    schedule = phases[0] if len(phases) == 1 else optax.join_schedules(phases, list(restarts))
    if name == "adamw":
        inner = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        inner = optax.adafactor(schedule, weight_decay_rate=weight_decay or None, multiply_by_parameter_scale=False)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
    return tx, schedule


def update_count(opt_state: Any) -> jax.Array:
    """The optimizer's own update counter (it does not advance on skipped steps)."""
    has_count = lambda x: "count" in getattr(type(x), "_fields", ())  # noqa: E731 (optax NamedTuples)
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=has_count):
        if has_count(leaf):
            return leaf.count
    return jnp.zeros((), jnp.int32)
