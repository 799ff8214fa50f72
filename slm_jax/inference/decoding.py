"""Autoregressive decoding: greedy and beam search, each one ``jax.lax.while_loop``.

The searches are model-agnostic. They drive a ``step_fn(tokens [N], state, step_index) ->
(logits or log-probs [N, V], new_state)`` where every leaf of ``state`` has the batch (greedy) or
batch * beams (beam search) as its leading axis, so beam search can reorder a whole state -
KV caches included - with one gather. Caches are preallocated, so the loop has static shapes
and never returns to the host between tokens.

The model-specific parts build the state and the step function:

- decoder-only (``Llama``): ``prefill`` runs the prompt embeddings through a cache of
  ``prompt_length + max_new_tokens`` slots once; each step embeds the fed token, writes it at the
  next slot with position = the number of real tokens so far, and returns its logits.
- encoder-decoder (``T5``): ``prefill`` encodes the prompt once and precomputes every
  cross-attention cache; each step runs the decoder on one token.

In both cases the first fed token is ``start_tokens`` (T5's decoder start token; for a
decoder-only model the first token of the answer block, e.g. the last token of a chat template,
or a BOS), so the first returned logits predict the first new token.

``generate`` puts it together (and is jitted: the model and the sizes are static).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.inference.processors import LogitsProcessor, ban_repeated_ngrams, standard_processors
from slm_jax.layers.attention import KVCache

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class GreedyOutput(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] int32, pad_id after the first eos
    lengths: jax.Array  # [B] generated tokens, the eos included




class BeamSearchOutput(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] int32: the best sequence, pad_id after its eos
    scores: jax.Array  # [B] its length-normalised log-probability
    lengths: jax.Array  # [B] its length, the eos included


def _check_search_args(start_tokens: jax.Array, max_new_tokens: int, num_beams: int = 1) -> None:
    if start_tokens.ndim != 1:
        raise ValueError(f"start_tokens must be [batch], got shape {start_tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _is_eos(tokens: jax.Array, eos_id: int | None) -> jax.Array:
    if eos_id is None:
        return jnp.zeros(tokens.shape, bool)
    return tokens == eos_id


def sequence_lengths(tokens: jax.Array, eos_id: int | None) -> jax.Array:
    """Length of each row up to and including its first eos (the full width when none)."""
    is_eos = _is_eos(tokens, eos_id)
    return jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1) + 1, tokens.shape[-1]).astype(jnp.int32)




def greedy_search(
    step_fn: StepFn, state: Any, start_tokens: jax.Array, max_new_tokens: int, eos_id: int | None,
    *, pad_id: int = 0, processors: Sequence[LogitsProcessor] = (),
) -> GreedyOutput:
    """Argmax decoding. Rows stop at their eos (later slots hold ``pad_id``); the loop ends when
    every row has stopped or after ``max_new_tokens`` tokens. ``eos_id=None`` never stops early.
    ``processors`` (slm_jax/inference/processors.py) change each step's logits in order and may
    end a row after its token, dropping its last tokens; each carries its own state."""
    _check_search_args(start_tokens, max_new_tokens)
    batch = start_tokens.shape[0]
    processors = tuple(processors)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return jnp.logical_and(i < max_new_tokens, jnp.logical_not(jnp.all(done)))

    def body(carry):
        i, tokens_in, state, out, done, lengths, processor_states = carry
        logits, state = step_fn(tokens_in, state, i)
        for processor, processor_state in zip(processors, processor_states):
            logits = processor.process(processor_state, logits, out, i)
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_tokens = jnp.where(done, pad_id, next_tokens)
        out = jax.lax.dynamic_update_slice(out, next_tokens[:, None], (0, i))
        ended = _is_eos(next_tokens, eos_id)
        live = jnp.logical_and(jnp.logical_not(done), jnp.logical_not(ended))
        lengths = lengths + jnp.logical_not(done).astype(jnp.int32)
        done = jnp.logical_or(done, ended)
        new_states = []
        for processor, processor_state in zip(processors, processor_states):
            processor_state, cut = processor.update(processor_state, next_tokens, out, i, live)
            new_states.append(processor_state)
            if cut is not None:  # rows that end here, without their last ``cut`` tokens
                ends = cut > 0
                out = jnp.where(jnp.logical_and(ends[:, None], jnp.arange(max_new_tokens)[None] > i - cut[:, None]),
                                pad_id, out)
                lengths = lengths - cut
                done = jnp.logical_or(done, ends)
        return i + 1, next_tokens, state, out, done, lengths, tuple(new_states)

    init = (
        jnp.asarray(0, jnp.int32),
        start_tokens.astype(jnp.int32),
        state,
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.int32),
        tuple(processor.init(batch) for processor in processors),
    )
    _, _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, init)
    return GreedyOutput(out, lengths)


def length_normalize(log_prob: jax.Array, length, length_penalty: float) -> jax.Array:
    """Hugging Face's score: sum of log-probs / length ** length_penalty (0 = no normalisation)."""
    return log_prob / jnp.asarray(length, jnp.float32) ** length_penalty


def beam_search(
    step_fn: StepFn, state: Any, start_tokens: jax.Array, max_new_tokens: int, eos_id: int | None,
    num_beams: int, length_penalty: float = 1.0, *, pad_id: int = 0, no_repeat_ngram_size: int = 0,
) -> BeamSearchOutput:
    """Beam search returning the best sequence per batch row by length-normalised score.

    Keeps ``num_beams`` alive hypotheses and a pool of the ``num_beams`` best finished ones
    (ended by eos). Each step ranks the 2 * num_beams best extensions (so at least num_beams of
    them do not end in eos): eos-ended ones enter the finished pool, the best others stay alive.
    A row is done when its pool is full and no alive hypothesis can still beat the worst
    finished one (log-probs only fall as a sequence grows, so its best possible score is its
    current log-prob normalised at the most favourable remaining length). Sequences that reach
    ``max_new_tokens`` without eos compete with the finished ones at the end.

    ``state`` leaves have the batch as leading axis; they are repeated num_beams times
    (batch-major: row b's beams are b * num_beams + k) and reordered with a gather each step.
    """
    _check_search_args(start_tokens, max_new_tokens, num_beams)
    batch, beams, steps = start_tokens.shape[0], num_beams, max_new_tokens
    neg_inf = jnp.float32(-jnp.inf)
    state = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), state)
    batch_offsets = (jnp.arange(batch) * beams)[:, None]

    def normalize(log_prob, length):
        return length_normalize(log_prob, length, length_penalty)

    def done_rows(i, alive_logp, finished_scores):
        # Alive hypotheses will have between i + 1 and `steps` tokens; the normalised score of a
        # fixed log-prob is monotone in the length, so the best case is at one of the ends.
        best_alive = alive_logp[:, 0]
        bound = jnp.maximum(normalize(best_alive, i + 1), normalize(best_alive, steps))
        return finished_scores[:, -1] >= bound

    def cond(carry):
        i, _, _, _, alive_logp, _, finished_scores = carry
        not_done = jnp.logical_not(jnp.all(done_rows(i, alive_logp, finished_scores)))
        return jnp.logical_and(i < steps, not_done)

    def gather_beams(x, index):  # x [B, n, ...], index [B, m] -> [B, m, ...]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(carry):
        i, tokens_in, state, alive_seqs, alive_logp, finished_seqs, finished_scores = carry
        logits, state = step_fn(tokens_in, state, i)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = ban_repeated_ngrams(log_probs, alive_seqs.reshape(batch * beams, steps), i,
                                        no_repeat_ngram_size).reshape(batch, beams, vocab)
        candidates = (alive_logp[:, :, None] + log_probs).reshape(batch, beams * vocab)
        top_logp, top_index = jax.lax.top_k(candidates, min(2 * beams, beams * vocab))
        source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = gather_beams(alive_seqs, source_beam)
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, :, None], (0, 0, i))
        ends = _is_eos(token, eos_id)

        # Finished pool: the best num_beams of the old pool and this step's eos-ended candidates.
        pool_scores = jnp.concatenate([finished_scores, jnp.where(ends, normalize(top_logp, i + 1), neg_inf)], axis=1)
        finished_scores, keep = jax.lax.top_k(pool_scores, beams)
        finished_seqs = gather_beams(jnp.concatenate([finished_seqs, sequences], axis=1), keep)

        # Alive beams: the best num_beams candidates that did not end.
        alive_logp, keep = jax.lax.top_k(jnp.where(ends, neg_inf, top_logp), beams)
        alive_seqs = gather_beams(sequences, keep)
        rows = (batch_offsets + gather_beams(source_beam, keep)).reshape(-1)
        state = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state)
        tokens_in = gather_beams(token, keep).reshape(-1)
        return i + 1, tokens_in, state, alive_seqs, alive_logp, finished_seqs, finished_scores

    init = (
        jnp.asarray(0, jnp.int32),
        jnp.repeat(start_tokens.astype(jnp.int32), beams),
        state,
        jnp.full((batch, beams, steps), pad_id, jnp.int32),
        # Only beam 0 starts alive: the others would duplicate it.
        jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, neg_inf)[None], (batch, 1)),
        jnp.full((batch, beams, steps), pad_id, jnp.int32),
        jnp.full((batch, beams), neg_inf),
    )
    i, _, _, alive_seqs, alive_logp, finished_seqs, finished_scores = jax.lax.while_loop(cond, body, init)
    # Hypotheses that ran out of room compete too (only possible when the loop used every step).
    alive_scores = jnp.where(i == steps, normalize(alive_logp, steps), neg_inf)
    scores = jnp.concatenate([finished_scores, alive_scores], axis=1)
    best = jnp.argmax(scores, axis=1)[:, None]
    tokens = gather_beams(jnp.concatenate([finished_seqs, alive_seqs], axis=1), best)[:, 0]
    return BeamSearchOutput(tokens, gather_beams(scores, best)[:, 0], sequence_lengths(tokens, eos_id))


# --- model-specific states and step functions -------------------------------------------------

class DecoderOnlyState(NamedTuple):
    cache: tuple[KVCache, ...]  # per layer, [B, prompt_length + max_new_tokens, kv_heads, head_dim]
    kv_mask: jax.Array  # [B, S] int32: which cache slots hold real tokens
    position: jax.Array  # [B] int32: position of the next token = real tokens so far
    slot: jax.Array  # [B] int32: cache slot of the next token (equal across rows)


class EncoderDecoderState(NamedTuple):
    cache: Any  # T5DecoderCache: decoder self-attention caches + precomputed cross-attention caches
    encoder_mask: jax.Array  # [B, encoder_length] int32


def is_encoder_decoder(model: nn.Module) -> bool:
    return hasattr(type(model), "encode")


def _variables(params: Any) -> dict:
    """Accepts a parameter tree or a full {'params': tree} variables dict."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params
    return {"params": params}


def _check_prompt(prompt_embeds: jax.Array, prompt_mask: jax.Array) -> None:
    if prompt_embeds.ndim != 3 or prompt_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(
            f"prompt_embeds must be [batch, length, dim] with prompt_mask [batch, length]; got "
            f"{prompt_embeds.shape} and {prompt_mask.shape}"
        )


def prefill(
    model: nn.Module, params: Any, prompt_embeds: jax.Array, prompt_mask: jax.Array, max_new_tokens: int
) -> DecoderOnlyState | EncoderDecoderState:
    """Runs the prompt once and returns the decoding state for ``make_step_fn``.

    Decoder-only: the prompt goes through a fresh cache of prompt_length + max_new_tokens slots.
    Encoder-decoder: the prompt is encoded and every decoder layer's cross-attention keys/values
    are computed once; the self-attention caches hold max_new_tokens slots.
    """
    _check_prompt(prompt_embeds, prompt_mask)
    variables = _variables(params)
    prompt_mask = prompt_mask.astype(jnp.int32)
    if is_encoder_decoder(model):
        def encode(m):
            return m.init_decoder_cache(m.encode(prompt_embeds, prompt_mask), max_new_tokens)

        return EncoderDecoderState(model.apply(variables, method=encode), prompt_mask)

    from slm_jax.models.llms.llama import init_cache

    batch, prompt_length = prompt_mask.shape
    cache = init_cache(model.config, batch, prompt_length + max_new_tokens)
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    _, cache = model.apply(variables, prompt_embeds, prompt_mask, cache=cache, cache_index=0, kv_mask=kv_mask)
    return DecoderOnlyState(
        cache=cache,
        kv_mask=kv_mask,
        position=jnp.sum(prompt_mask, axis=1).astype(jnp.int32),
        slot=jnp.full((batch,), prompt_length, jnp.int32),
    )


def make_step_fn(model: nn.Module, params: Any) -> StepFn:
    """The ``step_fn`` for ``greedy_search`` / ``beam_search`` over a ``prefill`` state."""
    variables = _variables(params)

    if is_encoder_decoder(model):
        def encoder_decoder_step(tokens, state: EncoderDecoderState, step_index):
            def run(m):
                hidden, cache = m.decode(
                    None, state.encoder_mask, tokens[:, None], None, cache=state.cache, cache_index=step_index
                )
                return m.logits(hidden)[:, 0], cache

            logits, cache = model.apply(variables, method=run)
            return logits, state._replace(cache=cache)

        return encoder_decoder_step

    def decoder_only_step(tokens, state: DecoderOnlyState, step_index):
        del step_index  # the state knows its slot (and each row its own position)
        batch = tokens.shape[0]
        slot = state.slot[0]
        real = jnp.ones((batch, 1), jnp.int32)
        kv_mask = jax.lax.dynamic_update_slice(state.kv_mask, real, (0, slot))

        def run(m):
            hidden, cache = m(
                m.embed(tokens[:, None]), real, state.position[:, None], cache=state.cache, cache_index=slot,
                kv_mask=kv_mask,
            )
            return m.logits(hidden)[:, 0], cache

        logits, cache = model.apply(variables, method=run)
        return logits, DecoderOnlyState(cache, kv_mask, state.position + 1, state.slot + 1)

    return decoder_only_step


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "num_beams", "length_penalty", "pad_id",
                              "no_repeat_ngram_size", "stop_on_repeated_ngram")
)
def generate(
    model: nn.Module,
    params: Any,
    prompt_embeds: jax.Array,
    prompt_mask: jax.Array,
    start_tokens: jax.Array,
    max_new_tokens: int,
    eos_id: int | None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    pad_id: int = 0,
    no_repeat_ngram_size: int = 0,
    stop_on_repeated_ngram: int = 0,
    processors: Sequence[LogitsProcessor] = (),
) -> GreedyOutput | BeamSearchOutput:
    """Generates from prompt embeddings with a ``Llama`` or ``T5`` (greedy when num_beams == 1).

    ``start_tokens`` [B] is the first token fed to the decoder (see the module docstring).
    Returns ``GreedyOutput(tokens, lengths)`` or ``BeamSearchOutput(tokens, scores, lengths)``
    with tokens [B, max_new_tokens], ``pad_id`` after each row's eos. ``no_repeat_ngram_size`` n > 0
    bans repeating any n-gram of the generated tokens (``ban_repeated_ngrams``); greedy decoding's
    ``stop_on_repeated_ngram`` n > 0 ends an answer where it repeats one (``StopOnRepeatedNgram``);
    greedy decoding also takes any other ``processors`` (slm_jax/inference/processors.py), after those two.
    """
    if num_beams > 1 and (stop_on_repeated_ngram or processors):
        raise ValueError("stop_on_repeated_ngram and logits processors are greedy-decoding rules; use num_beams=1")
    state = prefill(model, params, prompt_embeds, prompt_mask, max_new_tokens)
    step_fn = make_step_fn(model, params)
    if num_beams == 1:
        return greedy_search(step_fn, state, start_tokens, max_new_tokens, eos_id, pad_id=pad_id,
                             processors=standard_processors(no_repeat_ngram_size, stop_on_repeated_ngram,
                                                            tuple(processors)))
    return beam_search(step_fn, state, start_tokens, max_new_tokens, eos_id, num_beams, length_penalty, pad_id=pad_id,
                       no_repeat_ngram_size=no_repeat_ngram_size)
