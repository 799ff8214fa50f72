"""What a frozen speech front end hands the adapter: ``SpeechRows``.

A front end is a flax module ``__call__(features [B, T, mels], mask [B, T]) -> SpeechRows``. The
paper's front end is a speech encoder (Whisper's or a Conformer), whose rows are its output frames.
A front end may also write text (the Whisper-transcriber cascade in slm_jax/contrib/whisper_cascade/
writes Whisper's transcript): its rows then carry the LLM token each one spells, as integers,
and the SLM gives the adapter the LLM's own embeddings of them (slm_jax/models/slm.py).

A front end's config may define ``prepare_params(params) -> params``: how the loaded frozen weights
become the weights it runs (slm_jax/weights/frozen.py calls it after loading; e.g. merging trained
low-rank factors). The weight loaders know nothing about any one front end.

On disk (the frozen front end's cache, slm_jax/data/cached/encoder_cache.py) rows are float32
arrays [N, D] or, with token ids, [N, D + 1] whose last column is the id (float32 holds every id
below 2**24 exactly): ``pack_rows`` and ``unpack_rows`` are that format's only writers and readers.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

NO_TOKEN = -1


@flax.struct.dataclass
class SpeechRows:
    hidden: jax.Array  # [B, N, D] float
    mask: jax.Array  # [B, N] 1 for real rows
    token_ids: Optional[jax.Array] = None  # [B, N] int32: the LLM token each row spells, NO_TOKEN for none


def writes_tokens(front_end_config) -> bool:
    """Whether a front end's rows carry LLM token ids (its config says so by ``writes_llm_tokens``)."""
    return bool(getattr(front_end_config, "writes_llm_tokens", False))


def pack_rows(hidden: np.ndarray, token_ids: np.ndarray | None) -> np.ndarray:
    """One example's rows [N, D] (+ ids [N]) as the float32 array the cache stores."""
    hidden = np.asarray(hidden, np.float32)
    if token_ids is None:
        return hidden
    return np.concatenate([hidden, np.asarray(token_ids, np.float32)[:, None]], axis=-1)


def unpack_rows(rows: np.ndarray, with_tokens: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of ``pack_rows``: ([N, D] float32, [N] int32 ids or None)."""
    rows = np.asarray(rows, np.float32)
    if not with_tokens:
        return rows, None
    return rows[..., :-1], np.rint(rows[..., -1]).astype(np.int32)


def speech_batch(packed: np.ndarray, mask: np.ndarray, with_tokens: bool) -> dict[str, np.ndarray]:
    """A padded batch of packed rows [B, N, W] and its mask -> the batch keys of precomputed speech:
    ``speech_hidden`` [B, N, D], ``speech_mask`` and, with tokens, ``speech_token_ids`` [B, N]
    (NO_TOKEN on padding)."""
    hidden, ids = unpack_rows(packed, with_tokens)
    out = {"speech_hidden": hidden, "speech_mask": mask}
    if ids is not None:
        out["speech_token_ids"] = np.where(np.asarray(mask) > 0, ids, NO_TOKEN).astype(np.int32)
    return out


def as_rows(batch, prefix: str = "speech") -> SpeechRows:
    """The SpeechRows a batch carries under ``speech_hidden``/``speech_mask``/``speech_token_ids``."""
    ids = batch.get(f"{prefix}_token_ids")
    return SpeechRows(batch[f"{prefix}_hidden"], batch[f"{prefix}_mask"],
                      None if ids is None else jnp.asarray(ids, jnp.int32))
