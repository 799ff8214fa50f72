"""WER of `slm-eval` reports on a generated corpus, broken down by what spoke each utterance:
its voice family (espeak-ng, flite, Piper, Kokoro) and what augmentation changed in its acoustics
(`--augment_share`: a speed change, and for some a room and/or a band limit). The shards do not
store voices; the corpus's manifest re-plans them (`corpus.planned_examples`).

  slm-eval ... --tasks=asr_en,asr_en_open --out=runs/eval.json
  .venv/bin/python scripts/wer_by_voice.py runs/eval.json [more reports of the same corpus ...]

Prints one row per report, task and group: the utterance count and the corpus WER (the same
normalisation as slm-eval). Only ASR tasks (a 'wer' in the report) are broken down. With
--baseline=REPORT (e.g. Whisper alone, from scripts/whisper_reference_wer.py --out) it also says on
how many utterances each report made more or fewer word edits than the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable


def groups_of(spec, synthesizer: str) -> tuple[str, str]:
    """The voice family and acoustics group an utterance is counted in."""
    from slm_jax.data.corpus import builder as corpus

    family = corpus.voice_family(spec) if synthesizer == "espeak" else synthesizer
    return family, acoustics_group(spec.acoustics)


def acoustics_group(acoustics) -> str:
    """'as synthesised', or what the augmentation did: every augmented utterance has its speed
    changed, and some also a room and/or a band limit (corpus.Acoustics)."""
    if acoustics is None:
        return "as synthesised"
    return " + ".join(["speed"] + (["room"] if acoustics.rt60_s > 0 else [])
                      + (["band limit"] if acoustics.low_hz > 0 else []))


def breakdown(report: dict, specs: dict, synthesizer: str) -> Iterable[tuple[str, str, int, float]]:
    """(task, group, utterances, WER) for every ASR task of ``report``: all, then each group."""
    from slm_jax.inference import metrics

    for task, predictions in sorted(report["predictions"].items()):
        if "wer" not in report["tasks"].get(task, {}):
            continue
        missing = [p["id"] for p in predictions if p["id"] not in specs]
        if missing:
            raise SystemExit(f"wer_by_voice: {len(missing)} predictions of {task} (e.g. {missing[0]}) are not "
                             "examples of this corpus: pass the corpus the report was made on (--corpus_dir)")
        # all, then the voice families, then the acoustics: each in sorted order.
        kinds: tuple[dict[str, list[dict]], ...] = ({"all": list(predictions)}, {}, {})
        for p in predictions:
            for kind, group in zip(kinds[1:], groups_of(specs[p["id"]], synthesizer)):
                kind.setdefault(group, []).append(p)
        for group, items in (pair for kind in kinds for pair in sorted(kind.items())):
            wer = metrics.word_error_rate([p["reference"] for p in items], [p["prediction"] for p in items])
            yield task, group, len(items), wer


def against_baseline(report: dict, baseline: dict) -> Iterable[tuple[str, int, int, int, int]]:
    """(task, utterances worse than the baseline, their extra word edits, utterances better, the edits
    they save) for every task the two reports share, matched by example id."""
    from slm_jax.inference import metrics

    def edits(p):
        return metrics.edit_distance(metrics.normalize_text(p["reference"]).split(),
                                     metrics.normalize_text(p["prediction"]).split())

    for task, predictions in sorted(report["predictions"].items()):
        base = {p["id"]: p for p in baseline["predictions"].get(task, [])}
        deltas = [edits(p) - edits(base[p["id"]]) for p in predictions if p["id"] in base]
        if deltas:
            worse, better = [d for d in deltas if d > 0], [-d for d in deltas if d < 0]
            yield task, len(worse), sum(worse), len(better), sum(better)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="slm-eval JSON reports (or scripts/whisper_reference_wer.py --out)")
    parser.add_argument("--corpus_dir", default=None, help="default: the corpus_dir each report records")
    parser.add_argument("--baseline", default=None,
                        help="a report of the same utterances (e.g. Whisper alone): also print, per report and "
                             "task, on how many utterances it made more / fewer word edits, and how many")
    args = parser.parse_args(argv)

    from slm_jax.data.corpus import builder as corpus

    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    planned: dict[str, tuple[dict, str]] = {}
    print(f"{'report':32s} {'task':14s} {'group':26s} {'utterances':>10s} {'WER':>7s}")
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        corpus_dir = args.corpus_dir or report.get("corpus_dir")
        if not corpus_dir:
            raise SystemExit(f"wer_by_voice: {path} records no corpus_dir; pass --corpus_dir")
        if corpus_dir not in planned:
            manifest = corpus.load_manifest(corpus_dir)
            planned[corpus_dir] = (corpus.planned_examples(manifest), manifest["config"]["synthesizer"])
        specs, synthesizer = planned[corpus_dir]
        for task, group, count, wer in breakdown(report, specs, synthesizer):
            print(f"{os.path.basename(path):32s} {task:14s} {group:26s} {count:10d} {100 * wer:6.1f}%")
        if baseline is not None:
            for task, worse, extra, better, saved in against_baseline(report, baseline):
                print(f"{os.path.basename(path):32s} {task:14s} against {os.path.basename(args.baseline)}: worse on "
                      f"{worse} utterances (+{extra} word edits), better on {better} (-{saved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
