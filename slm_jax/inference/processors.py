"""Logits processors for greedy decoding (slm_jax/inference/decoding.py), each carrying its own state.

A processor is a pytree (flax.struct dataclass: its arrays are jit inputs, its settings static) with
  ``init(batch)``                                  -> its state (leading axis: the batch);
  ``process(state, logits [B, V], generated [B, T], step)``   -> logits;
  ``update(state, tokens [B], generated, step, live [B])``    -> (state, cut): ``cut`` [B] int32 or
      None; a row with cut > 0 ends at this step and its last ``cut`` tokens are dropped.
The greedy loop knows none of them: a new decoding rule is a new processor, not a new loop.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import flax
import jax
import jax.numpy as jnp


class LogitsProcessor(Protocol):
    def init(self, batch: int) -> Any: ...

    def process(self, state: Any, logits: jax.Array, generated: jax.Array, step: jax.Array) -> jax.Array: ...

    def update(self, state: Any, tokens: jax.Array, generated: jax.Array, step: jax.Array, live: jax.Array
               ) -> tuple[Any, jax.Array | None]: ...


def ban_repeated_ngrams(scores: jax.Array, generated: jax.Array, length: jax.Array, ngram_size: int) -> jax.Array:
    """Sets to -inf the score of every token that would complete an n-gram already generated.

    scores [N, V]; generated [N, T] the tokens so far in slots [0, length) (later slots ignored).
    Hugging Face's ``no_repeat_ngram_size`` over the generated tokens (the prompt is embeddings,
    so it has no tokens to match): a guard against the repetition loops a weakly grounded
    answer falls into. ``ngram_size`` 0 returns ``scores`` unchanged.
    """
    if ngram_size < 1:
        return scores
    rows, width = generated.shape
    if ngram_size == 1:  # every generated token is banned
        seen = jnp.where(jnp.arange(width)[None, :] < length, generated, scores.shape[-1])
        return scores.at[jnp.arange(rows)[:, None], seen].set(-jnp.inf, mode="drop")
    # The last n-1 tokens (slots length-n+1 .. length-1), compared with every earlier window
    # of n-1 tokens that has a successor inside the generated part.
    starts = jnp.arange(width)
    context = length - ngram_size + 1
    match = starts[None, :] + ngram_size - 1 < length  # [1, T] window start j is complete with its successor
    match = jnp.broadcast_to(match, (rows, width))
    for k in range(ngram_size - 1):
        window = jnp.take(generated, jnp.clip(starts + k, 0, width - 1), axis=1)
        last = jnp.take_along_axis(generated, jnp.clip(jnp.broadcast_to(context + k, (rows, 1)), 0, width - 1), axis=1)
        match = match & (window == last)
    match = match & (context >= 0)  # fewer than n-1 tokens: nothing to compare
    successor = jnp.take(generated, jnp.clip(starts + ngram_size - 1, 0, width - 1), axis=1)
    banned = jnp.where(match, successor, scores.shape[-1])  # out of range: dropped
    return scores.at[jnp.arange(rows)[:, None], banned].set(-jnp.inf, mode="drop")


def repeats_an_earlier_ngram(tokens: jax.Array, last: jax.Array, n: int) -> jax.Array:
    """[B] whether tokens[:, last-n+1 : last+1] also occurs earlier (starting before last-n+1)."""
    width = tokens.shape[1]
    recent = jax.lax.dynamic_slice_in_dim(jnp.pad(tokens, ((0, 0), (n, 0))), last + 1, n, axis=1)  # [B, n]
    padded = jnp.pad(tokens, ((0, 0), (0, n)), constant_values=-1)
    same = jnp.ones(tokens.shape, bool)
    for i in range(n):  # same[:, j]: the n-gram starting at j equals the recent one
        same = jnp.logical_and(same, padded[:, i: i + width] == recent[:, i: i + 1])
    earlier = jnp.arange(width)[None] < last - n + 1
    return jnp.logical_and(last >= n, jnp.any(jnp.logical_and(same, earlier), axis=1))


def repeated_ngram_copy(tokens: jax.Array, step: jax.Array, live: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The stop rule for repetition loops ("Al-Bab, Al-Bab, Al-Bab, ..."): a live row whose tokens
    in slots step-n+1 .. step repeat an earlier n-gram ends there, and that second copy is dropped.
    -> (copy [B, T], the slots to drop; looped [B], the rows that end)."""
    looped = jnp.logical_and(live, repeats_an_earlier_ngram(tokens, step, n))
    return jnp.logical_and(jnp.arange(tokens.shape[1])[None] > step - n, looped[:, None]), looped


@flax.struct.dataclass
class NoRepeatNgram:
    """Never repeat an n-gram of the generated tokens (``ban_repeated_ngrams``)."""

    n: int = flax.struct.field(pytree_node=False)

    def init(self, batch: int) -> tuple:
        return ()

    def process(self, state, logits, generated, step):
        return ban_repeated_ngrams(logits, generated, step, self.n)

    def update(self, state, tokens, generated, step, live):
        return state, None


@flax.struct.dataclass
class StopOnRepeatedNgram:
    """End a row where its last n tokens repeat an earlier n-gram, dropping that second copy
    (``repeated_ngram_copy``): the stop rule for repetition loops."""

    n: int = flax.struct.field(pytree_node=False)

    def init(self, batch: int) -> tuple:
        return ()

    def process(self, state, logits, generated, step):
        return logits

    def update(self, state, tokens, generated, step, live):
        looped = jnp.logical_and(live, repeats_an_earlier_ngram(generated, step, self.n))
        return state, jnp.where(looped, self.n, 0).astype(jnp.int32)


def standard_processors(no_repeat_ngram_size: int = 0, stop_on_repeated_ngram: int = 0,
                        extra: Sequence[LogitsProcessor] = ()) -> tuple:
    """Extra processors first (they may bias towards tokens), then the repeat ban and the stop rule."""
    out = list(extra)
    if no_repeat_ngram_size > 0:
        out.append(NoRepeatNgram(no_repeat_ngram_size))
    if stop_on_repeated_ngram > 0:
        out.append(StopOnRepeatedNgram(stop_on_repeated_ngram))
    return tuple(out)
