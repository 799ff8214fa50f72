"""Decoding that follows the cascade front end's own transcript: ``TranscriptGuide``, a logits
processor for greedy decoding (slm_jax/inference/processors.py).

The Whisper front end writes a transcript (front_end.py); an adapter behind it rewords and drops
words Whisper had right. The guide adds a bonus to the logit of the transcript's next token while
the answer keeps to it, and to end-of-turn once it is used up. It is a copying rule: the answers
are the cascade's, which is why it belongs to the cascade baseline and not the paper's design.
"""

from __future__ import annotations

from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.data import batching

# Tokens an answer that follows the transcript may write beyond it (closing punctuation Whisper
# left out); past that, end-of-turn gets a growing bonus (TranscriptGuide.answer_length).
GUIDE_END_SLACK = 2


@flax.struct.dataclass
class TranscriptGuide:
    """A transcript the answer should follow: greedy decoding adds a bonus to the logit of the
    guide's next token while the answer keeps to it (``follow_guide``), and to eos from the step
    the guide is used up. For a front end that writes its own transcript (Whisper's decoder): the
    adapter rewords and drops words Whisper had right, and this is a copy prior that lets go
    where the model departs from the transcript with confidence."""

    tokens: jax.Array  # [B, G] int32 LLM token ids of each row's transcript (anything after its length)
    lengths: jax.Array  # [B] int32
    bias: jax.Array  # [B, G] float: the bonus for each guide token (0: the guide leaves that token to the model)
    end_bias: jax.Array  # [] float: the bonus for eos once the guide is used up
    # [B] int32 or None: the most tokens an answer that follows the guide needs. From that step
    # on, eos gets end_bias more at each step, whether the answer follows the guide or not: an
    # answer that departed from Whisper's transcript and never found it again ("C8 green keys" ->
    # "Camelia, I am a British-American writer who ...") would otherwise go on to max_new_tokens.
    answer_length: jax.Array | None = None
    end_bias_id: int | None = flax.struct.field(pytree_node=False, default=None)  # eos: the id end_bias goes to

    # --- a logits processor (slm_jax/inference/processors.py); state: (place in the guide, following) ---
    def init(self, batch: int):
        return jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)

    def process(self, state, logits, generated, step):
        position, following = state
        return logits + guide_bonus(self, position, following, logits.shape[-1], self.end_bias_id, step
                                    ).astype(logits.dtype)

    def update(self, state, tokens, generated, step, live):
        return follow_guide(self, state[0], tokens), None


# How far ahead of its place a token may be found in the guide and still count as keeping to it
# (the answer skipped a few of the transcript's tokens, e.g. an opening "For example,").
GUIDE_WINDOW = 16


def guide_bonus(guide: TranscriptGuide, position: jax.Array, following: jax.Array, vocab_size: int,
                eos_id: int | None, written: jax.Array | int = 0) -> jax.Array:
    """[B, V] float32: each following row's bonus for its next guide token (eos at the end), and
    eos's growing bonus once ``written`` (tokens so far) reaches the guide's answer_length."""
    at = jnp.minimum(position, guide.tokens.shape[1] - 1)[:, None]
    inside = position < guide.lengths
    target = jnp.where(inside, jnp.take_along_axis(guide.tokens, at, axis=1)[:, 0], -1 if eos_id is None else eos_id)
    bias = jnp.where(inside, jnp.take_along_axis(guide.bias, at, axis=1)[:, 0], guide.end_bias)
    bonus = jax.nn.one_hot(target, vocab_size, dtype=jnp.float32) * jnp.where(following, bias, 0.0)[:, None]
    if guide.answer_length is not None and eos_id is not None:
        overrun = jnp.maximum(written + 1 - guide.answer_length, 0).astype(jnp.float32)  # [B]
        bonus = bonus.at[:, eos_id].add(guide.end_bias * overrun)
    return bonus


def follow_guide(guide: TranscriptGuide, position: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """After the answer wrote ``token`` [B]: (the guide position after it, whether the row still
    follows the guide). It keeps to the guide when the token is among the next GUIDE_WINDOW guide
    tokens; the position then moves past the first such one. Otherwise the position stays, and
    a later token found there takes the row back. A row whose guide is used up follows it (to
    its end) whatever it writes."""
    index = jnp.arange(guide.tokens.shape[1])[None]
    ahead = jnp.logical_and(index >= position[:, None],
                            index < jnp.minimum(position + GUIDE_WINDOW, guide.lengths)[:, None])
    found = jnp.logical_and(ahead, guide.tokens == token[:, None])
    kept = jnp.any(found, axis=1)
    position = jnp.where(kept, jnp.argmax(found, axis=1) + 1, position).astype(jnp.int32)
    return position, jnp.logical_or(kept, position >= guide.lengths)


def number_tokens(pieces: Sequence[str]) -> list[bool]:
    """Which of a transcript's token texts spell a number: those with a digit, and the bare space
    before one (a byte-level BPE writes " 1977" as " ", "1", "9", "7", "7"). The transcript guide
    leaves them to the model: Whisper writes digits, and an adapter trained on spelled-out numbers
    ("nine four three four") converts them; a bonus on them would undo that."""
    digit = [any(c.isdigit() for c in piece) for piece in pieces]
    return [d or (not piece.strip() and i + 1 < len(pieces) and digit[i + 1])
            for i, (piece, d) in enumerate(zip(pieces, digit))]


def transcript_guide(vocabulary, transcripts: Sequence[Sequence[int]], bias: float, token_bucket: int = 8
                     ) -> TranscriptGuide:
    """The guide for LLM-token transcripts (one list per answer) with logit bonus ``bias``."""
    width = max(token_bucket, -(-max(len(t) for t in transcripts) // token_bucket) * token_bucket)
    tokens, mask = batching.pad_rows([list(t) for t in transcripts], width)
    numbers = np.zeros(tokens.shape, bool)
    for i, row in enumerate(transcripts):
        numbers[i, :len(row)] = number_tokens([vocabulary.decode([t]) for t in row])
    lengths = np.asarray(mask).sum(axis=1).astype(np.int32)
    # An answer that follows the transcript writes each of its tokens once, a number's digits as
    # words (" nine" for "9": the digit and its word each take a token, so two per digit token
    # allows "twenty-one" for "21"), and may close with punctuation Whisper left out.
    answer_length = lengths + numbers.sum(axis=1).astype(np.int32) + GUIDE_END_SLACK
    return TranscriptGuide(np.asarray(tokens, np.int32), lengths, np.where(numbers, 0.0, bias).astype(np.float32),
                           np.asarray(bias, np.float32), answer_length, end_bias_id=int(vocabulary.eos_id))
