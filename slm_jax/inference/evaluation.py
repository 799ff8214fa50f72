"""Task-level evaluation: generate answers for a set of examples and score them per task.

Metric by task family: ASR -> word error rate; AST -> BLEU (sacrebleu); instruction and
zero-shot tasks -> exact-match accuracy after normalisation (biasing tasks, whose answer is a
transcript, -> WER and the share of answers that contain the biased name).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from slm_jax.inference import metrics


def task_family(task: str) -> str:
    return task.split("_", 1)[0]


def is_transcript_task(task: str) -> bool:
    return task.startswith("asr_") or "biasing" in task


def score_task(task: str, references: Sequence[str], predictions: Sequence[str],
               examples: Sequence[Mapping[str, Any]] | None = None) -> dict[str, float]:
    out: dict[str, float] = {"examples": len(references)}
    if task.startswith("ast_"):
        out["bleu"] = metrics.bleu(references, predictions)
    elif is_transcript_task(task):
        out["wer"] = metrics.word_error_rate(references, predictions)
        if "biasing" in task and examples is not None:
            names = [e.get("biased_name") or _biased_name(e) for e in examples]
            hits = [n is not None and metrics.normalize_text(n) in metrics.normalize_text(p)
                    for n, p in zip(names, predictions)]
            out["name_recall"] = float(np.mean(hits)) if hits else 0.0
    else:
        out["accuracy"] = metrics.exact_match(references, predictions)
    return out


def _biased_name(example: Mapping[str, Any]) -> str | None:
    """The listed name that the reference transcript contains (biasing tasks)."""
    instruction, target = example.get("instruction", ""), metrics.normalize_text(example.get("target", ""))
    if ":" not in instruction:
        return None
    for name in instruction.rsplit(":", 1)[1].strip(" .").split(","):
        if name.strip() and metrics.normalize_text(name) in target:
            return name.strip()
    return None


def headline(scores: Mapping[str, float]) -> tuple[str, float]:
    for key in ("wer", "bleu", "accuracy"):
        if key in scores:
            return key, scores[key]
    raise KeyError("no metric")


def evaluate(
    examples: Sequence[Mapping[str, Any]],
    answer: Callable[[Sequence[Mapping[str, Any]]], list[str]],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """Runs ``answer`` over examples in batches (grouped by task) and scores every task."""
    from tqdm import tqdm

    by_task: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for ex in examples:
        by_task[ex["task"]].append(ex)
    report: dict[str, Any] = {"tasks": {}, "predictions": {}}
    start = time.time()
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress)
    for task in sorted(by_task):
        items = by_task[task]
        predictions: list[str] = []
        for i in range(0, len(items), batch_size):
            predictions += answer(items[i: i + batch_size])
            bar.update(len(items[i: i + batch_size]))
        report["tasks"][task] = score_task(task, [e["target"] for e in items], predictions, items)
        report["predictions"][task] = [
            {"id": e["id"], "instruction": e["instruction"], "reference": e["target"], "prediction": p}
            for e, p in zip(items, predictions)
        ]
    bar.close()
    report["seconds"] = round(time.time() - start, 2)
    return report


def fixed_batch(answer: Callable[[Sequence[Any]], list[str]], batch_size: int) -> Callable[[Sequence[Any]], list[str]]:
    """``answer`` that always sees exactly ``batch_size`` items: a short batch is filled with
    copies of its last item and the extra answers dropped, so jitted generation compiles once."""

    def padded(items: Sequence[Any]) -> list[str]:
        items = list(items)
        if not items:
            return []
        if len(items) > batch_size:
            raise ValueError(f"{len(items)} items for a fixed batch of {batch_size}")
        return answer(items + [items[-1]] * (batch_size - len(items)))[: len(items)]

    return padded
