"""CTC alignment of the adapter's outputs with the frozen LLM's token embeddings.

Why: the next-token loss reaches the adapter only through the whole frozen LLM. Early in training
the LLM can lower that loss by guessing the corpus's sentence patterns from the instruction
alone, so the adapter learns slowly what the speech says (measured on the default model: held-out
WER 87% after 300 next-token steps). The alignment objective asks the adapter directly for what
the LLM needs: at each output frame, an embedding close to the LLM's own embedding of the token
being spoken, or "nothing" (CTC's blank), scored with CTC against the transcript.

  logits[b, t, 0]     = 0                                  (blank: the zero vector's score)
  logits[b, t, 1 + k] = <adapter_out[b, t], E[ids[k]]>     (E: the frozen LLM's input embeddings)

``ids`` is a fixed sub-vocabulary (every token of the training transcripts): scoring against all
49k SmolLM2 embeddings per frame would cost more than the adapter itself. The objective needs no
LLM forward pass, so a step costs a few percent of a next-token step; training runs it for the
first phase of a run and then switches to the next-token loss (the phases of slm_jax/training/loop.py;
the objective itself is slm_jax/training/objectives.py's ``CtcAlignment``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLANK = 0


class AlignmentVocabulary:
    """The token ids the alignment scores against, and the map from LLM ids to CTC classes.

    CTC class 0 is the blank; class ``1 + k`` is LLM token ``ids[k]``.
    """

    def __init__(self, token_ids: Iterable[int], vocab_size: int):
        ids = np.unique(np.asarray(list(token_ids), np.int64))
        if ids.size == 0:
            raise ValueError("the alignment vocabulary is empty: no transcript has any token")
        if ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"alignment token ids must lie in [0, {vocab_size}); got {ids[0]}..{ids[-1]}")
        self.ids = ids.astype(np.int32)
        # LLM id -> CTC class; -1 for tokens outside the sub-vocabulary.
        self.classes = np.full((vocab_size,), -1, np.int32)
        self.classes[self.ids] = np.arange(1, ids.size + 1, dtype=np.int32)

    def __len__(self) -> int:
        return int(self.ids.size)

    def to_classes(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """LLM ids [B, L] -> CTC classes [B, L]; a real token outside the vocabulary is an error."""
        classes = np.where(mask > 0, self.classes[tokens], 0)
        unknown = (classes < 0) & (mask > 0)
        if unknown.any():
            raise ValueError(f"transcript tokens {sorted(set(tokens[unknown].tolist()))[:10]} are not in the "
                             f"alignment vocabulary ({len(self)} tokens from the training transcripts)")
        return classes


def alignment_logits(speech_embeds: jax.Array, token_embeddings: jax.Array) -> jax.Array:
    """[B, T, D] adapter outputs, [V, D] embeddings of the sub-vocabulary -> [B, T, 1 + V] logits."""
    scores = jnp.einsum("btd,vd->btv", speech_embeds.astype(jnp.float32), token_embeddings.astype(jnp.float32))
    return jnp.concatenate([jnp.zeros(scores.shape[:2] + (1,), scores.dtype), scores], axis=-1)


def adapter_ctc_logits(slm, rows, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The CTC logits of the adapter's outputs for ``rows`` (SpeechRows) against the LLM's embeddings
    of ``token_ids`` [V]: [B, T', 1 + V] and the frame mask. No LLM layer runs. Called as
    ``slm.apply(variables, rows, token_ids, method=adapter_ctc_logits)``.

    Refused for rows that spell LLM tokens (a front end that writes text): CTC over them is met by
    copying the text, so it would teach the adapter nothing about the sound."""
    if rows.token_ids is not None:
        raise ValueError(TEXT_FRONT_END)
    speech_embeds, speech_mask = slm.adapt(rows)
    return alignment_logits(speech_embeds, slm.embed_tokens(token_ids[None, :])[0]), speech_mask


TEXT_FRONT_END = ("the CTC alignment scores a speech encoder's rows against the transcript, and this front end's "
                  "rows spell the transcript already (it writes text): train it with the next-token objective only")


def ctc_feasible(frames: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
    """Whether each row's transcript fits its frames: CTC needs one frame per label plus one blank
    between each pair of equal neighbours. A row that does not fit has no alignment at all."""
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & (label_mask[:, 1:] > 0), axis=1)
    return frames >= jnp.sum(label_mask > 0, axis=1) + repeats


def ctc_alignment_loss(
    logits: jax.Array, frame_mask: jax.Array, labels: jax.Array, label_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of CTC losses over the rows that fit, number of their label tokens).

    Rows whose transcript cannot fit their frames are left out (they would add a constant
    ~1e5 from CTC's log-epsilon and no useful gradient) and do not count as tokens.
    """
    frame_mask = frame_mask.astype(jnp.float32)
    label_mask = label_mask.astype(jnp.float32)
    per_row = optax.ctc_loss(logits, 1.0 - frame_mask, labels, 1.0 - label_mask, blank_id=BLANK)
    fits = ctc_feasible(jnp.sum(frame_mask, axis=1), labels, label_mask).astype(jnp.float32)
    return jnp.sum(per_row * fits), jnp.sum(jnp.sum(label_mask, axis=1) * fits)


def greedy_decode(logits: np.ndarray, frame_mask: np.ndarray, vocabulary: AlignmentVocabulary) -> list[list[int]]:
    """Best path per row, repeats merged and blanks dropped, as LLM token ids (a diagnostic of
    what the adapter 'says' before the LLM reads it)."""
    best = np.argmax(logits, axis=-1)
    out = []
    for row, mask in zip(best, frame_mask):
        tokens, previous = [], BLANK
        for c in row[: int(np.sum(mask))]:
            if c != previous and c != BLANK:
                tokens.append(int(vocabulary.ids[c - 1]))
            previous = c
        out.append(tokens)
    return out


def transcript_token_ids(vocabulary, transcripts: Sequence[str]) -> list[list[int]]:
    """The transcripts as LLM token ids (no EOS: the alignment target is the spoken words only)."""
    return [list(vocabulary.encode(t)) for t in transcripts]
