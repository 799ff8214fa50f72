"""The cascade's transcript guide: a logits processor that follows the front end's own transcript."""

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.contrib.whisper_cascade import transcript_guide as tg
from slm_jax.inference import decoding


def _preferring_step_fn(script, margins):
    """Row b prefers script[b][i] at step i by margins[b][i] logits over every other token."""
    script, margins = jnp.asarray(script), jnp.asarray(margins, jnp.float32)

    def step(tokens, rows, step_index):
        return jax.nn.one_hot(script[rows, step_index], 16) * margins[rows, step_index][:, None], rows

    return step


def test_a_transcript_guide_is_followed_where_the_model_is_unsure_and_let_go_where_it_departs():
    eos, pad = 2, 15
    script = [[5, 6, 7, 8, 8, 8], [4, 11, 12, eos, 9, 9], [13, 14, eos, 9, 9, 9], [6, 7, 5, 8, 8, 8],
              [5, 11, 8, 8, 8, 8]]
    margins = [[1] * 6, [10] * 6, [10, 1, 10, 10, 10, 10], [1] * 6, [1, 10, 1, 1, 1, 1]]
    tokens = [[5, 9, 7, 0], [4, 5, 11, 12], [3, 4, 0, 0], [6, 9, 5, 4], [5, 0, 0, 0]]
    bias = np.full((5, 4), 2.0, np.float32)
    bias[3, 1] = 0.0  # the guide leaves its second token to row 3's model
    guide = tg.TranscriptGuide(jnp.asarray(tokens, jnp.int32), jnp.asarray([3, 4, 2, 4, 1], jnp.int32),
                                     jnp.asarray(bias), jnp.asarray(2.0), end_bias_id=eos)

    def run(g):
        return jax.jit(lambda: decoding.greedy_search(_preferring_step_fn(script, margins), jnp.arange(5),
                                                      jnp.zeros((5,), jnp.int32), 6, eos, pad_id=pad,
                                                      processors=(g,) if g is not None else ()))()

    out = run(guide)
    # Row 0 is unsure (margin 1 < bonus 2): it writes the guide's 9 for its own 6, and ends where
    # the guide does instead of going on with 8s.
    np.testing.assert_array_equal(out.tokens[0], [5, 9, 7, eos, pad, pad])
    # Row 1 is sure: it skips the guide's 5 and finds its place again at 11.
    np.testing.assert_array_equal(out.tokens[1], [4, 11, 12, eos, pad, pad])
    # Row 2 departs at once (13 is not in its guide): from then on the guide gives no bonus, so
    # its unsure 14 stands against the guide's 3.
    np.testing.assert_array_equal(out.tokens[2], [13, 14, eos, pad, pad, pad])
    # Row 3 gets no bonus for the guide's 9 and writes its own 7; its 5 takes it back to the
    # guide, whose 4 and eos then win over its unsure 8s.
    np.testing.assert_array_equal(out.tokens[3], [6, 7, 5, 4, eos, pad])
    # Row 4 goes on past the end of its guide with a sure 11; the eos bonus stays, and wins at
    # the next unsure step.
    np.testing.assert_array_equal(out.tokens[4], [5, 11, eos, pad, pad, pad])
    np.testing.assert_array_equal(out.lengths, [4, 4, 3, 5, 3])
    unguided = run(None)
    np.testing.assert_array_equal(unguided.tokens[0], [5, 6, 7, 8, 8, 8])
    zero = guide.replace(bias=jnp.zeros_like(guide.bias), end_bias=jnp.asarray(0.0))
    np.testing.assert_array_equal(run(zero).tokens, unguided.tokens)


def test_an_answer_that_runs_past_its_guides_answer_length_is_pushed_to_end():
    eos, pad = 2, 15
    # Both rows are sure of tokens the guide never has (margin 5 > bonus 2): they depart at once.
    script = [[5, 6, 7, 8, 9, 10, 11, 12]] * 2
    guide = tg.TranscriptGuide(jnp.asarray([[3, 4], [3, 4]], jnp.int32), jnp.asarray([2, 2], jnp.int32),
                                     jnp.full((2, 2), 2.0), jnp.asarray(2.0), jnp.asarray([3, 5], jnp.int32),
                             end_bias_id=eos)
    out = jax.jit(lambda: decoding.greedy_search(_preferring_step_fn(script, [[5.0] * 8] * 2), jnp.arange(2),
                                                 jnp.zeros((2,), jnp.int32), 8, eos, pad_id=pad, processors=(guide,)))()
    # eos gets 2 at the step that reaches answer_length, 4 at the next, 6 at the one after: it
    # beats the sure margin of 5 on the third step there.
    np.testing.assert_array_equal(out.tokens, [[5, 6, 7, 8, 9, eos, pad, pad], [5, 6, 7, 8, 9, 10, 11, eos]])
    unbounded = jax.jit(lambda: decoding.greedy_search(_preferring_step_fn(script, [[5.0] * 8] * 2), jnp.arange(2),
                                                       jnp.zeros((2,), jnp.int32), 8, eos, pad_id=pad,
                                                       processors=(guide.replace(answer_length=None),)))()
    np.testing.assert_array_equal(unbounded.tokens[0], script[0])  # without it, they run to max_new_tokens


def test_follow_guide_moves_past_the_first_match_within_the_window():
    guide = tg.TranscriptGuide(jnp.asarray([[1, 2, 3, 2] + [4] * 20 + [9]] * 3, jnp.int32),
                                     jnp.asarray([25, 25, 3], jnp.int32), jnp.full((3, 25), 1.0), jnp.asarray(0.5))
    position, following = tg.follow_guide(guide, jnp.asarray([1, 0, 1]), jnp.asarray([2, 9, 3]))
    # Row 0: 2 is next; row 1: 9 is further than GUIDE_WINDOW ahead; row 2: 3 is next, at its end.
    np.testing.assert_array_equal(position, [2, 0, 3])
    np.testing.assert_array_equal(following, [True, False, True])
    bonus = tg.guide_bonus(guide, position, following, 16, eos_id=7)
    np.testing.assert_array_equal(np.argmax(bonus, axis=1)[np.array([0, 2])], [3, 7])  # the next token; eos at the end
    np.testing.assert_array_equal(bonus.sum(axis=1), [1.0, 0.0, 0.5])  # none when not following; end_bias at the end


def test_the_guide_leaves_numbers_and_the_space_before_them_to_the_model():
    from slm_jax.contrib.whisper_cascade.transcript_guide import number_tokens

    pieces = ["The", " code", " is", " ", "1", "9", "7", "7", ".", " ", "Then", " 5", " o", " ", "x"]
    assert [p for p, n in zip(pieces, number_tokens(pieces)) if n] == [" ", "1", "9", "7", "7", " 5"]
    assert number_tokens([]) == [] and number_tokens([" "]) == [False]
