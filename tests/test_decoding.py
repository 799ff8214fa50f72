"""Greedy and beam search: exact optima on hand-made distributions, eos handling, and the
model step functions (the beam reorders real KV caches)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.inference import decoding
from slm_jax.inference.processors import NoRepeatNgram, ban_repeated_ngrams, standard_processors
from slm_jax.models.llms import llama, t5
from slm_jax.models.llms.llama import Llama
from slm_jax.models.llms.t5 import T5

pytestmark = pytest.mark.slow  # a module-scoped fixture or every test here takes seconds


# --- a hand-made model: a random next-token distribution at every node of a prefix tree -------
#
# Node 0 is the empty prefix; the child of node c by token t is c * V + t + 1. The state is
# (row, node), so a beam search that reorders the state wrongly reads the wrong distributions.

VOCAB, EOS, STEPS = 4, 3, 4
NUM_NODES = sum(VOCAB ** d for d in range(STEPS))


def tree_step_fn(log_probs_table):
    """step_fn over a [batch, NUM_NODES, VOCAB] table of log-probabilities."""
    table = jnp.asarray(log_probs_table)

    def step(tokens, state, step_index):
        row, node = state
        # The start token leads to the root; later tokens move down the tree.
        node = jnp.where(step_index == 0, 0, node * VOCAB + tokens + 1)
        return table[row, node], (row, node)

    return step


def random_tree(seed, batch=2, sharpness=1.0):
    logits = np.random.RandomState(seed).normal(size=(batch, NUM_NODES, VOCAB)) * sharpness
    return logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))


def initial_state(batch):
    return (jnp.arange(batch), jnp.zeros((batch,), jnp.int32))


def exhaustive_best(log_probs, length_penalty, eos=EOS):
    """Best (tokens, score) of one row over every sequence: ended by eos, or STEPS long."""
    best_tokens, best_score = None, -np.inf

    def visit(node, prefix, logp):
        nonlocal best_tokens, best_score
        for token in range(VOCAB):
            total = logp + log_probs[node, token]
            sequence = prefix + [token]
            if token == eos or len(sequence) == STEPS:
                score = total / len(sequence) ** length_penalty
                if score > best_score:
                    best_tokens, best_score = sequence, score
            else:
                visit(node * VOCAB + token + 1, sequence, total)

    visit(0, [], 0.0)
    return best_tokens + [0] * (STEPS - len(best_tokens)), best_score


def exhaustive_greedy(log_probs, eos=EOS):
    node, tokens = 0, []
    while len(tokens) < STEPS:
        token = int(np.argmax(log_probs[node]))
        tokens.append(token)
        if token == eos:
            break
        node = node * VOCAB + token + 1
    return tokens + [0] * (STEPS - len(tokens))


@functools.partial(jax.jit, static_argnames=("num_beams", "length_penalty", "eos_id"))
def run_beam(table, num_beams, length_penalty, eos_id=EOS):
    batch = table.shape[0]
    return decoding.beam_search(tree_step_fn(table), initial_state(batch), jnp.zeros((batch,), jnp.int32), STEPS,
                                eos_id, num_beams, length_penalty)


@functools.partial(jax.jit, static_argnames=("eos_id",))
def run_greedy(table, eos_id=EOS):
    batch = table.shape[0]
    return decoding.greedy_search(tree_step_fn(table), initial_state(batch), jnp.zeros((batch,), jnp.int32), STEPS,
                                  eos_id)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(length_penalty):
    """With as many beams as prefixes the search is exhaustive: it must return the true best."""
    beam_differs_from_greedy = False
    for seed in range(4):
        table = random_tree(seed)
        out = run_beam(table, num_beams=VOCAB ** (STEPS - 1), length_penalty=length_penalty)
        greedy = run_greedy(table)
        for b in range(table.shape[0]):
            tokens, score = exhaustive_best(table[b], length_penalty)
            np.testing.assert_array_equal(out.tokens[b], tokens)
            np.testing.assert_allclose(out.scores[b], score, rtol=1e-5)
            length = tokens.index(EOS) + 1 if EOS in tokens else STEPS
            assert out.lengths[b] == length
            np.testing.assert_array_equal(greedy.tokens[b], exhaustive_greedy(table[b]))
            beam_differs_from_greedy |= not np.array_equal(greedy.tokens[b], tokens)
    assert beam_differs_from_greedy  # the cases are not all trivially greedy


def test_two_beams_beat_greedy_on_a_garden_path():
    """Token 0 looks best first (0.5) but every continuation is poor (0.25 each); token 1 (0.4)
    is followed by eos with 0.9: beam search returns [1, eos] (0.36), greedy [0, 0] (0.125)."""
    probs = np.full((1, NUM_NODES, VOCAB), 0.25)
    probs[0, 0] = [0.5, 0.4, 0.0, 0.1]
    probs[0, 0 * VOCAB + 1 + 1] = [0.05, 0.05, 0.0, 0.9]  # node of the prefix [1]
    table = np.log(np.maximum(probs, 1e-30))
    out = run_beam(table, num_beams=2, length_penalty=0.0)
    np.testing.assert_array_equal(out.tokens[0], [1, EOS, 0, 0])
    np.testing.assert_allclose(out.scores[0], np.log(0.36), rtol=1e-6)
    assert out.lengths[0] == 2
    np.testing.assert_array_equal(run_greedy(table).tokens[0], [0, 0, 0, 0])


def test_one_beam_equals_greedy_without_eos():
    for seed in range(3):
        table = random_tree(seed)
        beam = run_beam(table, num_beams=1, length_penalty=0.0, eos_id=None)
        greedy = run_greedy(table, eos_id=None)
        np.testing.assert_array_equal(beam.tokens, greedy.tokens)
        np.testing.assert_array_equal(beam.lengths, [STEPS, STEPS])


def scripted_step_fn(script):
    """Row b emits script[b, i] at step i (one-hot logits); the state is the row index."""
    script = jnp.asarray(script)

    def step(tokens, rows, step_index):
        return jax.nn.one_hot(script[rows, step_index], 16) * 10.0, rows

    return step


def test_greedy_stops_at_eos_and_pads_after_it():
    eos, pad = 2, 15
    script = [[5, eos, 7, 7, 7], [4, 4, 4, 4, 4], [eos, 9, 9, 9, 9]]
    out = jax.jit(lambda: decoding.greedy_search(scripted_step_fn(script), jnp.arange(3), jnp.zeros((3,), jnp.int32),
                                                 5, eos, pad_id=pad))()
    np.testing.assert_array_equal(out.tokens, [[5, eos, pad, pad, pad], [4, 4, 4, 4, 4], [eos, pad, pad, pad, pad]])
    np.testing.assert_array_equal(out.lengths, [2, 5, 1])


def test_greedy_stop_on_repeated_ngram_keeps_a_loop_once():
    eos, pad = 2, 15
    script = [[5, 6, 7, 6, 7, 6, 7, 6, 7, 6],  # "5 (6 7)*": ends after one copy of "6 7"
              [3, 4, 5, 6, 3, 4, 5, 8, eos, 9],  # "3 4" repeats (n=2: ends there); no 4-gram does
              [6, 6, 6, 6, 6, 6, 6, 6, 6, 6]]  # one token forever: "6 6" repeats at the third, kept once
    out = jax.jit(lambda: decoding.greedy_search(scripted_step_fn(script), jnp.arange(3), jnp.zeros((3,), jnp.int32),
                                                 10, eos, pad_id=pad, processors=standard_processors(0, 2)))()
    np.testing.assert_array_equal(out.tokens[0], [5, 6, 7] + [pad] * 7)
    np.testing.assert_array_equal(out.lengths, [3, 4, 1])
    np.testing.assert_array_equal(out.tokens[1], [3, 4, 5, 6] + [pad] * 6)
    np.testing.assert_array_equal(out.tokens[2], [6] + [pad] * 9)
    out4 = jax.jit(lambda: decoding.greedy_search(scripted_step_fn(script), jnp.arange(3), jnp.zeros((3,), jnp.int32),
                                                  10, eos, pad_id=pad, processors=standard_processors(0, 4)))()
    np.testing.assert_array_equal(out4.tokens[1], [3, 4, 5, 6, 3, 4, 5, 8, eos, pad])
    np.testing.assert_array_equal(out4.tokens[0], [5, 6, 7] + [pad] * 7)  # "6 7 6 7" again at slot 3 (overlapping)
    np.testing.assert_array_equal(out4.lengths, [3, 9, 1])


def test_beam_search_refuses_logits_processors():
    with pytest.raises(ValueError, match="greedy-decoding rules"):
        decoding.generate.__wrapped__(None, None, None, None, jnp.zeros((1,), jnp.int32), 4, 2, num_beams=2,
                                      processors=(NoRepeatNgram(2),))


def test_greedy_loop_ends_when_every_row_is_done():
    eos, calls = 2, []
    step = scripted_step_fn([[5, eos, 7, 7, 7, 7], [eos, 9, 9, 9, 9, 9]])

    def counted_step(tokens, rows, step_index):
        jax.debug.callback(lambda i: calls.append(int(i)), step_index)
        return step(tokens, rows, step_index)

    out = decoding.greedy_search(counted_step, jnp.arange(2), jnp.zeros((2,), jnp.int32), 6, eos)
    jax.block_until_ready(out)
    assert calls == [0, 1]  # no step after both rows produced eos


def test_beam_search_pads_after_eos():
    eos, pad = 2, 15
    script = [[5, eos, 7, 7], [4, 4, 4, 4]]
    out = decoding.beam_search(scripted_step_fn(script), jnp.arange(2), jnp.zeros((2,), jnp.int32), 4, eos,
                               num_beams=2, length_penalty=1.0, pad_id=pad)
    np.testing.assert_array_equal(out.tokens, [[5, eos, pad, pad], [4, 4, 4, 4]])
    np.testing.assert_array_equal(out.lengths, [2, 4])


def test_search_arguments_are_checked():
    with pytest.raises(ValueError, match="start_tokens must be \\[batch\\]"):
        decoding.greedy_search(scripted_step_fn([[1]]), jnp.arange(1), jnp.zeros((1, 1), jnp.int32), 1, None)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        decoding.beam_search(scripted_step_fn([[1]]), jnp.arange(1), jnp.zeros((1,), jnp.int32), 1, None, 0)


# --- the model step functions: beam search reorders real KV caches -----------------------------

def _tiny_models():
    llama_cfg = llama.llama_tiny(embedding_init_std=1.0)
    t5_cfg = t5.t5_tiny()
    embeds = jnp.zeros((1, 3, 64))
    ones = jnp.ones((1, 3), jnp.int32)
    llama_params = jax.jit(Llama(llama_cfg).init)(jax.random.PRNGKey(0), embeds, ones)["params"]
    t5_params = jax.jit(T5(t5_cfg).init)(jax.random.PRNGKey(1), embeds[..., :32], ones, ones, ones)["params"]
    return {"llama": (Llama(llama_cfg), llama_params), "t5": (T5(t5_cfg), t5_params)}


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


def _prompt(model, params, seed):
    """Two prompts of different lengths (the second right-padded) as embeddings."""
    ids = jax.random.randint(jax.random.PRNGKey(seed), (2, 6), 2, model.config.vocab_size)
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=type(model).embed))(params, ids), mask


@functools.partial(jax.jit, static_argnums=0)
def _sequence_log_prob(model, params, embeds, mask, start, tokens):
    """Teacher-forced sum of log-probs of ``tokens`` (all of them, no eos)."""
    inputs = jnp.concatenate([start[:, None], tokens[:, :-1]], axis=1)

    def run(m):
        if isinstance(m, T5):
            hidden, _ = m.decode(m.encode(embeds, mask), mask, inputs)
        else:
            full = jnp.concatenate([embeds, m.embed(inputs)], axis=1)
            full_mask = jnp.concatenate([mask, jnp.ones(inputs.shape, jnp.int32)], axis=1)
            hidden, _ = m(full, full_mask)
            hidden = hidden[:, -inputs.shape[1]:]
        return m.logits(hidden)

    log_probs = jax.nn.log_softmax(model.apply({"params": params}, method=run).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0], axis=1)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_model_beam_search_scores_are_the_true_sequence_log_probs(tiny_models, family):
    """Beam search over a real model: the returned score equals the teacher-forced log-prob of
    the returned sequence (wrongly reordered caches would break this), it is at least the
    greedy sequence's, and one beam reproduces greedy decoding."""
    model, params = tiny_models[family]
    embeds, mask = _prompt(model, params, seed=0)
    start, steps = jnp.asarray([1, 1], jnp.int32), 6
    greedy = decoding.generate(model, params, embeds, mask, start, steps, None)
    one_beam = jax.jit(
        lambda: decoding.beam_search(decoding.make_step_fn(model, params),
                                     decoding.prefill(model, params, embeds, mask, steps), start, steps, None, 1, 0.0)
    )()
    np.testing.assert_array_equal(one_beam.tokens, greedy.tokens)

    beam = decoding.generate(model, params, embeds, mask, start, steps, None, num_beams=4, length_penalty=0.0)
    np.testing.assert_allclose(beam.scores, _sequence_log_prob(model, params, embeds, mask, start, beam.tokens),
                               rtol=1e-5)
    greedy_score = _sequence_log_prob(model, params, embeds, mask, start, greedy.tokens)
    assert np.all(np.asarray(beam.scores) >= np.asarray(greedy_score) - 1e-5)


def test_generate_rejects_bad_prompts(tiny_models):
    model, params = tiny_models["llama"]
    with pytest.raises(ValueError, match="prompt_embeds must be \\[batch, length, dim\\]"):
        decoding.generate(model, params, jnp.zeros((2, 3, 64)), jnp.ones((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32),
                          4, None)


def test_prefill_state_leaves_lead_with_the_batch(tiny_models):
    for model, params in tiny_models.values():
        embeds, mask = _prompt(model, params, seed=1)
        state = jax.jit(lambda: decoding.prefill(model, params, embeds, mask, 5))()
        assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(state))


# --- the n-gram repetition ban ------------------------------------------------------------------

def _banned_reference(generated, length, n):
    """Brute force: tokens that would complete an n-gram already in generated[:length]."""
    seq = list(generated[:length])
    if n == 1:
        return set(seq)
    if length < n - 1:
        return set()
    context = seq[length - n + 1:]
    return {seq[j + n - 1] for j in range(length - n + 1) if seq[j:j + n - 1] == context}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ban_repeated_ngrams_matches_brute_force(n):
    rng = np.random.RandomState(n)
    vocab, width = 5, 12
    generated = rng.randint(0, vocab, size=(16, width))
    for length in range(width + 1):
        scores = rng.normal(size=(16, vocab)).astype(np.float32)
        got = np.asarray(ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(generated), jnp.asarray(length), n))
        for row in range(16):
            banned = _banned_reference(generated[row], length, n)
            assert {t for t in range(vocab) if np.isneginf(got[row, t])} == banned, (row, length)
            kept = [t for t in range(vocab) if t not in banned]
            np.testing.assert_array_equal(got[row, kept], scores[row, kept])
    unchanged = ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(generated), jnp.asarray(5), 0)
    np.testing.assert_array_equal(np.asarray(unchanged), scores)


def _looping_step_fn(vocab=6):
    """A model stuck in a loop: after token t it prefers t+1 mod 3 (0 1 2 0 1 2 ...); tokens
    3..5 are always less likely, in that order. Logits depend only on the last token."""
    table = np.full((vocab, vocab), -5.0, np.float32)
    for t in range(vocab):
        table[t, (t + 1) % 3] = 5.0
        table[t, 3:] = [1.0, 0.5, 0.0]

    def step(tokens, state, step_index):
        return jnp.asarray(table)[tokens], state

    return step


@pytest.mark.parametrize("num_beams", [1, 3])
def test_searches_never_repeat_a_banned_ngram(num_beams):
    step = _looping_step_fn()
    start = jnp.asarray([0, 1], jnp.int32)
    search = functools.partial(decoding.greedy_search) if num_beams == 1 else functools.partial(
        decoding.beam_search, num_beams=num_beams, length_penalty=0.0)
    free = np.asarray(search(step, (), start, 10, None).tokens)
    assert free[0].tolist()[:6] == [1, 2, 0, 1, 2, 0]  # without the ban: the loop
    for n in (2, 3):
        ban = {"processors": (NoRepeatNgram(n),)} if num_beams == 1 else {"no_repeat_ngram_size": n}
        tokens = np.asarray(search(step, (), start, 10, None, **ban).tokens)
        for row in tokens.tolist():
            grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)
