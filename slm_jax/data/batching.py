"""Numpy batch assembly: token rows, prompts and targets padded into the model's batch layout.

The model's batch (see slm_jax/models/slm.py): ``prefix_tokens/suffix_tokens`` around the speech,
``decoder_input_tokens`` (targets shifted right behind the decoder start token),
``target_tokens`` ending with EOS, and 0/1 masks; every block right-padded to a fixed length.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from slm_jax.data.prompting import PromptFormat, PromptIds


class TooLongError(ValueError):
    """An example does not fit the configured lengths (never truncated silently)."""


def pad_rows(rows: Sequence[Sequence[int]], length: int, what: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids [N, length], mask [N, length]); a row longer than ``length`` is an error."""
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise TooLongError(f"{what} row {i} has {len(row)} tokens, more than the configured {length}")
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def pad_frames(arrays: Sequence[np.ndarray], length: int, what: str = "audio") -> tuple[np.ndarray, np.ndarray]:
    """[frames_i, D] arrays -> ([N, length, D], mask [N, length])."""
    dim = arrays[0].shape[1]
    out = np.zeros((len(arrays), length, dim), np.float32)
    mask = np.zeros((len(arrays), length), np.int32)
    for i, a in enumerate(arrays):
        if a.shape[0] > length:
            raise TooLongError(f"{what} {i} has {a.shape[0]} frames, more than the configured {length}")
        out[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = 1
    return out, mask


def target_ids(vocabulary: Any, target: str) -> list[int]:
    return list(vocabulary.encode(target)) + [int(vocabulary.eos_id)]


def text_batch(
    prompts: Sequence[PromptIds], targets: Sequence[Sequence[int]], lengths: dict[str, int]
) -> dict[str, np.ndarray]:
    """Prompt and teacher-forcing arrays for a batch (targets already end with EOS)."""
    prefix, prefix_mask = pad_rows([p.prefix for p in prompts], lengths["prefix"], "prefix")
    suffix, suffix_mask = pad_rows([p.suffix for p in prompts], lengths["suffix"], "suffix")
    target, target_mask = pad_rows(targets, lengths["targets"], "target")
    decoder_input = np.zeros_like(target)
    decoder_input[:, 0] = [p.decoder_start for p in prompts]
    decoder_input[:, 1:] = target[:, :-1]
    decoder_input *= target_mask
    return {
        "prefix_tokens": prefix, "prefix_mask": prefix_mask, "suffix_tokens": suffix, "suffix_mask": suffix_mask,
        "decoder_input_tokens": decoder_input, "target_tokens": target, "target_mask": target_mask,
    }


def encode_prompts(vocabulary: Any, prompt_format: PromptFormat, instructions: Sequence[str]) -> list[PromptIds]:
    cache: dict[str, PromptIds] = {}
    out = []
    for text in instructions:
        if text not in cache:
            cache[text] = prompt_format.encode(vocabulary, text)
        out.append(cache[text])
    return out


def bucket_length(needed: int, quantum: int, cap: int) -> int:
    """The padded length for a batch whose longest row needs ``needed``: the next multiple of
    ``quantum``, never above ``cap`` (the configured maximum, itself always a valid shape).

    Padding to a few bucket sizes instead of the corpus maximum saves the compute spent on
    padding, while keeping the number of distinct shapes (one XLA compilation each) small."""
    if needed > cap:
        raise TooLongError(f"a row needs {needed}, more than the configured {cap}")
    return min(-(-max(needed, 1) // quantum) * quantum, cap)


def length_grouped_batches(
    window: Sequence[int], sizes: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Cuts a window of example indices into batches of similar length, in random batch order.

    ``window`` holds ``k * batch_size`` indices drawn at random (e.g. a slice of an epoch's
    permutation) and ``sizes[i]`` is example i's cost (its sequence length). Sorting inside the
    window keeps each batch's rows alike, so bucketed padding stays small, while the window
    itself is random, so task proportions and epoch coverage are unchanged; shuffling the
    batches avoids a short-to-long curriculum inside each window."""
    if len(window) % batch_size:
        raise ValueError(f"window of {len(window)} examples is not a multiple of batch size {batch_size}")
    ordered = sorted(window, key=lambda i: sizes[i])  # stable: ties keep their random order
    batches = [ordered[b: b + batch_size] for b in range(0, len(ordered), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]

