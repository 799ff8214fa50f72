"""CTC alignment of the adapter's outputs with the frozen LLM's token embeddings.

Why: the next-token loss reaches the adapter only through the whole frozen LLM. Early in training
the LLM can lower that loss by guessing the corpus's sentence patterns from the instruction
alone, so the adapter learns slowly what the speech says (measured on the default model: held-out
WER 87% after 300 next-token steps). The alignment objective asks the adapter directly for what
the LLM needs: at each output frame, an embedding close to the LLM's own embedding of the token
being spoken, or "nothing" (CTC's blank), scored with CTC against the transcript.

  logits[b, t, 0]     = 0                                  (blank: the zero vector's score)
  logits[b, t, 1 + k] = <adapter_out[b, t], E[ids[k]]>     (E: the frozen LLM's input embeddings)

Centred scoring (``AlignmentVocabulary(centered=True)``): both sides have the sub-vocabulary's
mean embedding removed before the dot product. SmolLM2's input embeddings share a large common
direction (mean |cosine| between random token embeddings 0.45), which the plain dot product gives
to every token alike; centring scores only what tells tokens apart. The adapter still outputs in
the LLM's own (uncentred) embedding space.

``ids`` is a fixed sub-vocabulary (every token of the training transcripts): scoring against all
49k SmolLM2 embeddings per frame would cost more than the adapter itself. The objective needs no
LLM forward pass, so a step costs a few percent of a next-token step; training runs it for the
first ``train.alignment_steps`` steps and then switches to the next-token loss (slm_jax/training/loop.py).

CTC compression (``ctc_compress``, ``train.ctc_compression``): the LLM reads only the frames the
CTC head calls a token, one embedding per run of equal labels, instead of every frame. Why: with
every frame in its prompt (most of them blanks, which no text ever puts there) the frozen
SmolLM2-135M invents content around the speech; measured on the default model, its answers on
real recordings stayed at WER 79% while the same adapter's own CTC transcript reached 47.5%
(release/README.md). Two modes say what each kept run becomes:
  'outputs'  the mean of the adapter's outputs over the run;
  'tokens'   the mean over the run of the expected token embedding under the CTC posterior
             (blank left out): a mixture of the LLM's own embeddings, so the LLM reads vectors of
             the kind text gives it. Why: the dot-product score is met by outputs far from any
             token embedding; measured on one adapter (4,000 alignment + 200 next-token steps,
             release/README.md) its kept outputs had 14-20x the norm of SmolLM2's embeddings and
             cosine 0-0.22 with the best token's.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLANK = 0
COMPRESSION_MODES = ("outputs", "tokens")


def compression_problem(mode: str, setting: str, off_allowed: bool = True) -> str | None:
    """Why ``mode`` is not a CTC compression mode ('' = off where ``off_allowed``), or None."""
    if (off_allowed and mode == "") or mode in COMPRESSION_MODES:
        return None
    off = "'' (off) or " if off_allowed else ""
    return f"{setting} must be {off}one of {COMPRESSION_MODES}, got {mode!r}"


class AlignmentVocabulary:
    """The token ids the alignment scores against, and the map from LLM ids to CTC classes.

    CTC class 0 is the blank; class ``1 + k`` is LLM token ``ids[k]``.
    """

    def __init__(self, token_ids: Iterable[int], vocab_size: int, centered: bool = False):
        ids = np.unique(np.asarray(list(token_ids), np.int64))
        if ids.size == 0:
            raise ValueError("the alignment vocabulary is empty: no transcript has any token")
        if ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"alignment token ids must lie in [0, {vocab_size}); got {ids[0]}..{ids[-1]}")
        self.ids = ids.astype(np.int32)
        self.centered = bool(centered)
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


def alignment_logits(speech_embeds: jax.Array, token_embeddings: jax.Array, centered: bool = False) -> jax.Array:
    """[B, T, D] adapter outputs, [V, D] embeddings of the sub-vocabulary -> [B, T, 1 + V] logits.
    ``centered``: the embeddings' mean is removed from both sides first (module docstring)."""
    speech_embeds, token_embeddings = speech_embeds.astype(jnp.float32), token_embeddings.astype(jnp.float32)
    if centered:
        mean = jnp.mean(token_embeddings, axis=0)
        speech_embeds, token_embeddings = speech_embeds - mean, token_embeddings - mean
    scores = jnp.einsum("btd,vd->btv", speech_embeds, token_embeddings)
    return jnp.concatenate([jnp.zeros(scores.shape[:2] + (1,), scores.dtype), scores], axis=-1)


def expected_token_embeddings(logits: jax.Array, token_embeddings: jax.Array) -> jax.Array:
    """[B, T, 1 + V] CTC logits, [V, D] embeddings -> [B, T, D]: each frame's mean token embedding
    under its posterior over the tokens (the blank left out and the rest renormalised)."""
    probs = jax.nn.softmax(logits[..., 1:].astype(jnp.float32), axis=-1)
    return jnp.einsum("btv,vd->btd", probs, token_embeddings.astype(jnp.float32))


def ctc_compress(
    speech_embeds: jax.Array, speech_mask: jax.Array, logits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Keeps one embedding per token of the CTC best path: [B, T, D] -> [B, T, D] and mask [B, T].

    Frames whose best class is the blank are dropped, each run of frames with the same best
    class becomes the mean of its embeddings, and the runs are packed to the front in order
    (the rest is padding, mask 0). The choice of frames carries no gradient; the kept means do.
    The length stays T so that shapes stay static; the mask says how many runs each row has.
    """
    best = jnp.argmax(logits, axis=-1)
    keep = (speech_mask > 0) & (best != BLANK)
    previous_best = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=BLANK)
    previous_keep = jnp.pad(keep[:, :-1], ((0, 0), (1, 0)), constant_values=False)
    starts = keep & ~(previous_keep & (previous_best == best))
    run = jnp.cumsum(starts, axis=1) - 1
    length = speech_embeds.shape[1]
    run = jnp.where(keep, run, length)  # dropped frames go past the last run, which segment_sum drops

    def merge(values, segments):
        return jax.ops.segment_sum(values, segments, num_segments=length)

    sums = jax.vmap(merge)(speech_embeds * keep[..., None].astype(speech_embeds.dtype), run)
    counts = jax.vmap(merge)(keep.astype(speech_embeds.dtype), run)
    mask = (jnp.arange(length)[None, :] < jnp.sum(starts, axis=1)[:, None]).astype(speech_mask.dtype)
    return sums / jnp.maximum(counts, 1)[..., None], mask


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
