"""Evaluation metrics: word error rate (ASR), BLEU (speech translation), exact-match accuracy."""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_PUNCTUATION = re.compile(r"[^\w\s']", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lower case, Unicode NFKC, punctuation removed, whitespace collapsed (Whisper-style basic)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitution = insertion = deletion = 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_token in enumerate(reference, 1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_token in enumerate(hypothesis, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_token != hyp_token))
        previous = current
    return previous[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus WER: total word edits / total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses):
        if normalize:
            ref, hyp = normalize_text(ref), normalize_text(hyp)
        ref_words, hyp_words = ref.split(), hyp.split()
        edits += edit_distance(ref_words, hyp_words)
        words += len(ref_words)
    return edits / max(words, 1)


def bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation), 0..100."""
    import sacrebleu

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Share of answers equal to the reference after normalisation."""
    if not references:
        return 0.0
    return sum(normalize_text(r) == normalize_text(h) for r, h in zip(references, hypotheses)) / len(references)
