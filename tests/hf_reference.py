"""Helpers for parity tests against Hugging Face PyTorch reference models."""

from __future__ import annotations

import numpy as np
import torch


def relative_error(got, want) -> float:
    """max |got - want| / max |want| (elementwise error relative to the reference's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def perturb_vectors(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Adds noise to every 1-D parameter (norm scales, biases) in place.

    HF initialises norms to one (Gemma: zero) and biases to zero, so an unperturbed model would
    not notice a converter that drops or misplaces them.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def pad_generated(tokens: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """HF stops a batch once every row is done: right-pad its new tokens to ``width``."""
    out = np.full((tokens.shape[0], width), pad_id, dtype=np.int64)
    out[:, : tokens.shape[1]] = tokens
    return out


def mid_sequence_token(tokens: np.ndarray) -> int:
    """A token that a greedy run emits mid-sequence in row 0: used as eos so that eos handling
    is exercised (the row stops there, the others run on or stop elsewhere)."""
    row = list(tokens[0])
    return int(row[len(row) // 2])
