"""The demo behind ``make demo`` / ``slm-demo``: build a speech corpus, train an adapter between a
frozen pretrained speech encoder and a frozen pretrained LLM inside a time budget, and report
what the result can and cannot do, next to a text cascade with the same LLM.

Phases (each timed and reported):
  1. corpus: espeak-ng speech for ASR, AST, instruction and zero-shot tasks
     (``slm_jax.data.corpus.builder.make_corpus``; reused when one with the same settings exists);
  2. encoder pass + step probe: the frozen encoder runs once over the corpus (cached on disk) and
     a few real train steps of both objectives measure this machine's step times;
  3. training: ``slm_jax.training.loop.train``: ``alignment_steps`` cheap CTC alignment steps
     (slm_jax/training/alignment.py), then as many next-token steps as fit the remaining budget (or
     ``--steps``), with the usual progress bar and time estimate;
  4. evaluation on the held-out test split: the SLM trained just now from speech, the SHIPPED
     release of the same design (release/whisper_base_smollm2, trained for 1,100 steps) on the
     same utterances, and the cascade (the same LLM given the reference transcript, and given the
     release's own transcript) from text, asked for the corpus's answer format;
  5. real human speech (release/real_speech/transcripts.tsv): the shipped release, Whisper-base
     alone, and Whisper-base's transcript read by the same LLM (the cascade), each with its WER;
     then the user's own recordings (``--wav``), transcribed by the release.

The live run shows that the design trains on this machine; on a busy machine it gets few steps
and learns little, so the release's column is what the design reaches, measured here and now.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("slm_jax.apps.demo")

TRANSCRIBE = "Transcribe the speech."
SPEECH = {"espeak": "synthetic espeak-ng speech", "tones": "tone sequences standing in for speech, not speech"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out_dir: str = "runs/demo"
    gin_files: tuple[str, ...] = ("whisper_base_smollm2.gin",)
    gin_bindings: tuple[str, ...] = ()
    corpus_size: int = 1500
    open_asr: int = 0  # extra free-form English ASR utterances (asr_en_open; release runs)
    languages: tuple[str, ...] = ("en", "fr")
    synthesizer: str = "espeak"
    workers: int = 2
    minutes: float = 23.0  # the whole demo, corpus to table (+ about 4 min of install: under 30)
    steps: int | None = None  # next-token steps; None: as many as fit the budget
    # CTC alignment steps first (slm_jax/training/alignment.py): a few percent of a next-token step each,
    # and on the demo corpus they carry most of the learning to hear the words.
    alignment_steps: int = 600
    checkpoint_every: int | None = None  # None: only at the end (long runs: keep intermediate ones)
    resume: bool = False  # continue OUT_DIR/train instead of starting afresh (long runs)
    min_steps: int = 20
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    eval_per_task: int = 16
    eval_batch_size: int = 8
    max_new_tokens: int = 24  # the longest corpus answer is about 20 tokens
    seed: int = 0
    # The shipped adapter evaluated next to the live run ('': not evaluated; relative paths are
    # looked up in the repository too). It must fit the demo's config (the default one does).
    release: str = "release/whisper_base_smollm2"
    # 'path<TAB>transcript' lines of real recordings for the real-speech section ('': none).
    real_speech: str = "release/real_speech/transcripts.tsv"
    real_speech_shown: int = 3  # recordings whose answers are printed
    wavs: tuple[str, ...] = ()  # the user's own recordings, transcribed by the release at the end


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Fewer next-token steps than this and the live run is not expected to transcribe (release/README.md:
# 600 alignment + 150 next-token steps gave WER 25.8%, + 500 gave 10.7%): the demo says so.
FEW_STEPS = 150
WAV_MAX_SECONDS = 29.0  # Whisper's 30 s window, less the second of silence its transcriber appends


def repo_path(path: str) -> str:
    """``path`` as given where it exists, else relative to the repository (``make demo`` and
    ``slm-demo`` from any directory find release/ alike); '' stays ''."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


# --quick: a smaller corpus and evaluation, about 5 minutes in all.
QUICK = {"corpus_size": 400, "minutes": 5.0, "eval_per_task": 4, "eval_batch_size": 4, "min_steps": 10,
         "warmup_steps": 5, "alignment_steps": 150}

# Evaluation cost in units of one measured train step of batch 8, for sizing the training to the
# budget. Measured with SmolLM2-135M on the shared 2-core CPU (slm-demo --quick, 2026-11-25): a
# greedy generation call (batch 8, 32 new tokens, KV cache) took about as long as one train
# step, and each of the two generation loops compiled in about 3-4 steps' time.
GENERATE_CALL_IN_STEPS = 1.0
COMPILE_IN_STEPS = 4.0
NUM_GENERATE_COMPILES = 2  # speech -> answer, and transcript text -> answer (cascade)
# The shipped release's evaluation adds generation calls at the same shapes (no compile; its
# adapter takes the live one's place in the same jitted model) and one load of its weights. The
# real-speech section compiles three more loops (the release at the recordings' length and answer
# length, Whisper-base's own decoder, the cascade's text prompt) and runs each once on the 7
# recordings (up to 11 s): measured 52 s where a full-length train step took about 5.3 s
# (slm-demo --quick on the shared 2-core CPU, load average 5, 2026-12-08), about 10 steps.
REAL_SPEECH_IN_STEPS = 12.0


class Clock:
    """Wall time since the demo started, against its budget."""

    def __init__(self, minutes: float):
        self.start = time.time()
        self.budget = minutes * 60.0
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def phase(self, name: str, started: float) -> None:
        self.phases[name] = round(time.time() - started, 1)
        print(f"[{name}] {self.phases[name]:.0f} s; {self.elapsed() / 60:.1f} of {self.budget / 60:.0f} min used",
              flush=True)


def steps_for_budget(seconds_left: float, step_seconds: float, eval_seconds: float, min_steps: int) -> int:
    """How many train steps fit in ``seconds_left`` after reserving ``eval_seconds`` (at least
    ``min_steps``: a run shorter than that shows nothing)."""
    if step_seconds <= 0:
        raise ValueError(f"step time must be positive, got {step_seconds}")
    return max(min_steps, int((seconds_left - eval_seconds) // step_seconds))


def estimate_eval_seconds(num_generate_calls: int, step_seconds: float) -> float:
    return step_seconds * (GENERATE_CALL_IN_STEPS * num_generate_calls + COMPILE_IN_STEPS * NUM_GENERATE_COMPILES)


# --- phase 1: corpus ---------------------------------------------------------------------------


def ensure_corpus(settings: DemoSettings) -> str:
    """The demo corpus in ``<out_dir>/corpus``: reused when its manifest has the same settings."""
    from slm_jax.data.corpus import builder as corpus

    directory = os.path.join(settings.out_dir, "corpus")
    wanted = {"size": settings.corpus_size, "seed": settings.seed, "languages": list(settings.languages),
              "synthesizer": settings.synthesizer, "open_asr": settings.open_asr}
    from slm_jax.data.errors import DataError

    try:
        config = {"open_asr": 0, **corpus.load_manifest(directory)["config"]}  # older manifests: none
        if all(config.get(k) == v for k, v in wanted.items()):
            print(f"corpus: reusing {directory} ({settings.corpus_size} utterances)", flush=True)
            return directory
    except DataError:  # no complete corpus there: make one
        pass
    print(f"corpus: synthesising {settings.corpus_size} utterances with {settings.synthesizer} into {directory}",
          flush=True)
    corpus.make_corpus(directory, settings.corpus_size, seed=settings.seed, workers=settings.workers,
                       languages=settings.languages, synthesizer=settings.synthesizer, vocab_size=0,
                       overwrite=True, open_asr=settings.open_asr)
    return directory


# --- phase 2: encoder cache and step probe --------------------------------------------------------


def probe_step_seconds(model: Any, data: Any, settings: DemoSettings, probe_steps: int = 2) -> dict[str, float]:
    """Loads the frozen models, encodes the corpus once (``data.attach_model``: cached on disk)
    and times ``probe_steps`` real train steps on one batch after compiling for its shape, for
    the next-token objective and (with ``settings.alignment_steps``) the alignment objective.

    Batches are length-bucketed, so their cost varies: the probe reports seconds per padded LLM
    token (the step is close to linear in it at these lengths) and the run's plan scales it by
    the planned batches' mean (``data.shape_plan``)."""
    import jax

    from slm_jax.parallel import partitioning
    from slm_jax.models.spec import sample_batch
    from slm_jax.weights.frozen import load_frozen_params
    from slm_jax.training.objectives import CtcAlignment, NextToken
    from slm_jax.training.optimizers import make_optimizer
    from slm_jax.training.step import Trainer

    tx, schedule = make_optimizer(learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
                                  total_steps=100)
    slm = model.build()
    trainer = Trainer(slm, tx, schedule, partitioning.make_mesh(data=-1))
    example = sample_batch(settings.batch_size, data.feature_lengths)
    started = time.time()
    frozen = load_frozen_params(trainer, model, example)
    loaded = time.time()
    data.attach_model(slm, frozen["speech_encoder"], model)
    encoded = time.time()
    objectives = {"next_token": NextToken()}
    if settings.alignment_steps:
        objectives["alignment"] = CtcAlignment().for_run(data, model)
    state = trainer.init_state(settings.seed, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    batch = next(data.train_batches(settings.batch_size, settings.seed + 1))

    def timed(objective):
        """(seconds to compile + run one step, seconds per step after it) for ``objective``."""
        nonlocal state
        objective = objectives[objective]
        placed = trainer.place_batch(batch, objective)
        began = time.time()
        state, metrics = trainer.train_step(state, frozen, placed, objective)
        jax.block_until_ready(metrics)
        compiled = time.time()
        for _ in range(probe_steps):  # the same shape: no compile
            state, metrics = trainer.train_step(state, frozen, placed, objective)
        jax.block_until_ready(metrics)
        return compiled - began, (time.time() - compiled) / probe_steps

    compile_seconds, step_seconds = timed("next_token")
    tokens = data.llm_tokens({"speech_frames": batch["speech_hidden"].shape[1], "prefix": batch["prefix_tokens"].shape[1],
                              "suffix": batch["suffix_tokens"].shape[1], "targets": batch["target_tokens"].shape[1]})
    probe = {"load_seconds": loaded - started, "encode_seconds": encoded - loaded,
             "compile_seconds": compile_seconds, "step_seconds": step_seconds,
             "seconds_per_llm_token": step_seconds / tokens}
    if settings.alignment_steps:
        probe["alignment_compile_seconds"], probe["alignment_step_seconds"] = timed("alignment")
    return probe


# --- phase 4: evaluation ------------------------------------------------------------------------


def test_examples(corpus_dir: str, per_task: int) -> list[dict]:
    """Up to ``per_task`` test examples of every task (zero-shot tasks included), in corpus order."""
    from slm_jax.data.cached.corpus_data import read_corpus

    kept, counts = [], {}
    for ex in read_corpus(corpus_dir, ["test"], include_zero_shot=True):
        counts[ex["task"]] = counts.get(ex["task"], 0) + 1
        if counts[ex["task"]] <= per_task:
            kept.append(ex)
    return kept


def count_generate_calls(examples: Sequence[Mapping[str, Any]], batch_size: int, release: bool = False) -> int:
    """Generation calls ``evaluate_all`` makes: the live SLM's answers per task (and with
    ``release`` the release's), then (non-ASR tasks) one SLM's transcripts and two cascade answers."""
    per_task: dict[str, int] = {}
    for ex in examples:
        per_task[ex["task"]] = per_task.get(ex["task"], 0) + 1
    calls = 0
    answering = 2 if release else 1
    for task, n in per_task.items():
        batches = math.ceil(n / batch_size)
        calls += batches * (answering if task.startswith("asr_") else answering + 3)
    return calls


def evaluate_all(slm: Any, data: Any, examples: list[dict], settings: DemoSettings,
                 release_params: Any = None) -> dict[str, Any]:
    """The live SLM's answers from speech (``report['slm']``); with ``release_params`` (the
    shipped release's parameters for the same model) the release's answers to the same examples
    (``report['release']``), from the same jitted model with its adapter in the live one's place
    (no new compile); then the cascade's answers from the reference transcript and from the
    release's own transcript (the live SLM's without a release), asked for the corpus's answer
    format. ``slm`` holds the live parameters again afterwards."""
    from slm_jax.data import audio
    from slm_jax.inference import evaluation
    from slm_jax.contrib.whisper_cascade.text_cascade import TextAnswerer

    for ex in examples:
        ex["features"] = audio.log_mel_spectrogram(ex["audio"])
    # One audio and prompt bucket for the whole test set: the generation loop compiles once.
    slm.audio_bucket_frames = -(-max(ex["features"].shape[0] for ex in examples) // 100) * 100
    slm.token_bucket = 48
    bs = settings.eval_batch_size

    def from_speech(instruction=None):
        return evaluation.fixed_batch(lambda batch: slm.generate(
            [e["features"] for e in batch], [instruction or e["instruction"] for e in batch],
            max_new_tokens=settings.max_new_tokens), bs)

    others = [ex for ex in examples if not ex["task"].startswith("asr_")]

    def transcripts() -> dict[str, str]:
        transcribe, own = from_speech(TRANSCRIBE), {}
        for i in range(0, len(others), bs):
            chunk = others[i: i + bs]
            own.update(zip([e["id"] for e in chunk], transcribe(chunk)))
        return own

    live = slm.params
    report = {"slm": evaluation.evaluate(examples, from_speech(), bs, desc="trained just now: answers from speech")}
    own, own_by = None, "live"
    if release_params is not None:
        slm.params = release_params
        try:
            report["release"] = evaluation.evaluate(examples, from_speech(), bs,
                                                    desc="shipped release: answers from speech")
            own, own_by = transcripts(), "release"
        finally:
            slm.params = live
    if others:
        own = own if own is not None else transcripts()
        text = TextAnswerer(slm.llm, slm.params["llm"], data.vocabulary, data.prompt_format, batch_size=bs,
                            max_new_tokens=settings.max_new_tokens)
        # One prompt length for every task's prompt (the reference or a transcript of up to max_new_tokens).
        text.min_prompt_length = settings.max_new_tokens + max(
            len(text.prompt_ids(e["text"], e["instruction"], e["task"])[0]) for e in others)

        def cascade(transcript_of):
            return evaluation.fixed_batch(lambda b: text.answer([transcript_of(e) for e in b],
                                                                [e["instruction"] for e in b], [e["task"] for e in b]), bs)

        report["cascade_reference"] = evaluation.evaluate(others, cascade(lambda e: e["text"]), bs,
                                                          desc="cascade: reference transcript")
        report["cascade_own"] = evaluation.evaluate(others, cascade(lambda e: own[e["id"]]), bs,
                                                    desc=f"cascade: {own_by} transcript")
        report["own_transcripts"] = own
        report["own_transcripts_by"] = own_by
    for ex in examples:
        ex.pop("features")
    return report


# --- the table and the plain statement ------------------------------------------------------------


def _cell(scores: Mapping[str, float] | None) -> str:
    if not scores:
        return "-"
    from slm_jax.inference.evaluation import headline

    metric, value = headline(scores)
    return f"{100 * value:.1f}%" if metric in ("wer", "accuracy") else f"{value:.1f}"


def live_label(run: Mapping[str, Any] | None) -> str:
    return f"trained just now, {run['steps']} steps" if run else "trained just now"


def release_label(report: Mapping[str, Any]) -> str:
    info = report.get("release_info") or {}
    return f"shipped release, {info['step']} steps" if "step" in info else "shipped release"


def _table(rows: Sequence[Sequence[str]], left: int) -> str:
    """Aligned columns, the first ``left`` of them left-aligned; a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def results_table(report: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> str:
    """Rows: tasks; columns: metric, the shipped release from speech (when evaluated), the SLM
    trained just now from speech, and the cascade from the reference transcript and from the
    release's (else the live SLM's) own transcript."""
    from slm_jax.inference.evaluation import headline

    columns = [("slm", live_label(run))]
    if "release" in report:
        columns.insert(0, ("release", release_label(report)))
    columns += [("cascade_reference", "cascade (reference text)"),
                ("cascade_own", f"cascade ({report.get('own_transcripts_by', 'live')} transcript)")]
    rows = [("task", "n", "metric", *(label for _, label in columns))]
    for task, scores in report["slm"]["tasks"].items():
        metric, _ = headline(scores)
        label = {"wer": "WER", "bleu": "BLEU", "accuracy": "accuracy"}[metric]
        rows.append((task + (" (zero-shot)" if task.startswith("zeroshot_") else ""), str(int(scores["examples"])),
                     label, *(_cell(report.get(key, {}).get("tasks", {}).get(task)) for key, _ in columns)))
    return _table(rows, left=3)


def _asr_verdict(wer: float) -> str:
    return ("usable transcripts" if wer < 0.15 else "partly right transcripts" if wer < 0.5
            else "it does not transcribe")


def live_run_note(run: Mapping[str, Any], release: bool) -> str | None:
    """A plain warning when the live run got too few next-token steps to learn (``FEW_STEPS``), and
    why: a busy machine (the load average when the demo started), ``--steps``, or a budget too
    short for this machine. None when it got enough."""
    next_token = run["steps"] - run.get("alignment_steps", 0)
    if next_token >= FEW_STEPS:
        return None
    load, cores = run.get("load_at_start"), run.get("cores") or 1
    got = f"the live run got {run['steps']} steps ({next_token} next-token steps after {run.get('alignment_steps', 0)} alignment)"
    if load is not None and load / cores >= 0.75:
        cause = f"this machine is busy (load average {load:.1f} on {cores} cores when the demo started): {got}"
    elif run.get("steps_asked"):
        cause = f"{got}, as --steps asked"
    else:
        cause = f"{got} in the {run.get('minutes', 0):g}-minute budget on this machine"
    then = ("; the shipped release's column shows what the design reaches (measured here, on the same utterances)"
            if release else "; it has not had the time to learn (release/README.md has a 1,100-step run)")
    return f"NOTE: {cause}, too few to learn to transcribe{then}."


def statement(report: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """What was measured, in words, good or bad."""
    tasks = report["slm"]["tasks"]
    lines = [
        f"Measured: the adapter trained just now ({run['adapter_params']:,} parameters; encoder and LLM frozen) for "
        f"{run['steps']} steps of {run['batch_size']} ({run.get('alignment_steps', 0)} of them CTC alignment; "
        f"{run['steps'] * run['batch_size']:,} examples, "
        f"{run['epochs']:.1f} passes over {run['train_examples']:,} training utterances) in "
        f"{run['train_seconds'] / 60:.1f} min; final training loss {run.get('loss', float('nan')):.3f}.",
        f"Evaluated on {sum(int(s['examples']) for s in tasks.values())} held-out test utterances "
        f"({SPEECH[run.get('synthesizer', 'espeak')]}; sentences of the same grammar as training, never the same "
        "example).",
    ]
    release = report.get("release", {}).get("tasks", {})
    if "release" in report:
        info = report.get("release_info", {})
        lines.append(f"The shipped release ({info.get('directory', 'release')}: the same design, adapter trained for "
                     f"{info.get('step', '?')} steps" + (f"; {info['note']}" if info.get("note") else "")
                     + ") answered the same utterances, with the same frozen encoder and LLM.")
    if "asr_en" in tasks:
        wer = tasks["asr_en"]["wer"]
        verdict = _asr_verdict(wer) if wer < 0.5 else "the adapter has not learned to transcribe yet in this run"
        said = f"English ASR: trained just now WER {100 * wer:.1f}% ({verdict})"
        if "asr_en" in release:
            said += f"; shipped release WER {100 * release['asr_en']['wer']:.1f}% ({_asr_verdict(release['asr_en']['wer'])})"
        lines.append(said + ".")
    zero = {t: s for t, s in tasks.items() if t.startswith("zeroshot_")}
    if zero:
        lines.append("Zero-shot (instructions never seen in training): " + "; ".join(
            f"{name}: " + ", ".join(f"{t[len('zeroshot_'):]} {_cell(s.get(t))}" for t in sorted(zero))
            for name, s in ([("shipped release", release)] if release else []) + [("trained just now", tasks)]) + ".")
    if "cascade_reference" in report:
        lines.append("The cascade columns show this same LLM reading text instead of speech, prompted for the "
                     "corpus's answer format (a system turn, worked examples, a hint; its first line counts): "
                     "given the reference transcript it is what a perfect recogniser would allow; given the "
                     f"{report.get('own_transcripts_by', 'live')} SLM's own transcript it is a two-stage pipeline. "
                     "The LLM was never trained on these tasks (the adapters were, through the speech), and the "
                     "dialog replies follow fixed rules of the corpus that no prompt states.")
    note = live_run_note(run, "release" in report)
    if note:
        lines.append(note)
    elif run["steps"] < 1000:
        lines.append(f"This is a short CPU run ({run['steps']} steps); numbers improve with more steps "
                     "(release/README.md has the command for a 1,100-step run and its status).")
    return "\n".join(lines)


def summary(report: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """The last word: what each model reached, measured in this run; the shipped release first."""
    parts = []
    release, live = report.get("release", {}).get("tasks", {}), report["slm"]["tasks"]
    if "asr_en" in live:
        live_run = f"the run trained just now ({run['steps']} steps)"
        wer = f"{100 * live['asr_en']['wer']:.1f}%"
        if "asr_en" in release:
            parts.append(f"on held-out synthetic English the shipped release has WER {100 * release['asr_en']['wer']:.1f}% "
                         f"({_asr_verdict(release['asr_en']['wer'])}) and {live_run} {wer}")
        else:
            parts.append(f"on held-out synthetic English {live_run} has WER {wer}")
    scores = (report.get("real_speech") or {}).get("scores") or {}
    if scores:
        speech = report["real_speech"]["speech_system"]
        parts.append(f"on real human speech the {speech} has WER {100 * scores[speech]['wer']:.1f}%"
                     + (f" and Whisper-base alone {100 * scores[WHISPER_ALONE]['wer']:.1f}%" if WHISPER_ALONE in scores else ""))
    return ("In short: " + "; ".join(parts) + ".") if parts else ""


def machine_load() -> dict[str, Any]:
    """The 1-minute load average and the cores this process may use, before the demo's own work."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return {"load_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cores": cores}


def release_mismatch(directory: str, model: Any) -> str | None:
    """Why the release in ``directory`` cannot serve the demo's model (its frozen encoder and LLM
    differ, e.g. with another --gin_file), from its metadata alone; None when it can."""
    from slm_jax.training import checkpointing

    try:
        metadata = checkpointing.read_metadata(*checkpointing.find_checkpoint_dir(directory))
    except (checkpointing.CheckpointError, OSError, ValueError) as e:
        return f"its checkpoint cannot be read ({e})"
    saved, wanted = metadata.get("frozen_sources"), dict(model.frozen_sources)
    if saved != wanted:
        return f"it was trained on the frozen models {saved}, this demo's config has {wanted}"
    return None


def load_release(directory: str, slm: Any, model: Any, data: Any) -> tuple[Any, dict[str, Any]]:
    """The shipped adapter in ``directory`` for ``slm``'s model: (its parameters, with ``slm``'s
    own frozen ones so that both adapters run in one jitted model; {'step', 'note'}). Raises
    ``CheckpointError``/``ValueError`` when it does not fit the model."""
    from slm_jax.inference import model as inference
    from slm_jax.training import checkpointing

    shipped, step = inference.load_trained(directory, model, data)
    note = checkpointing.read_metadata(*checkpointing.find_checkpoint_dir(directory)).get("release", {}).get("note", "")
    return {**slm.params, "adapter": shipped.params["adapter"]}, {"step": step, "note": note}


def sample_predictions(report: Mapping[str, Any], per_task: int = 2, key: str = "slm") -> str:
    lines = []
    for task, rows in report[key]["predictions"].items():
        for row in rows[:per_task]:
            lines.append(f"  {task:<26} {row['instruction'][:40]!r:<44} ref {row['reference']!r}  ->  "
                         f"{row['prediction'][:80]!r}")
    return "\n".join(lines)


# --- real human speech ------------------------------------------------------------------------------

WHISPER_ALONE = "Whisper-base alone"
CASCADE = "cascade: Whisper-base -> LLM"
REAL_SPEECH_NEW_TOKENS = 48  # the longest transcript in release/real_speech/transcripts.tsv is about 30 tokens


def read_transcripts(tsv: str) -> list[tuple[str, str]]:
    """(audio path, reference) of each 'path<TAB>transcript' line (paths relative to the file; '#' comments)."""
    from slm_jax.errors import UserError

    base = os.path.dirname(os.path.abspath(tsv))
    rows = []
    with open(tsv, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, tab, reference = line.rstrip("\n").partition("\t")
            if not tab or not reference.strip():
                raise UserError(f"{tsv}:{number}: expected 'path<TAB>transcript'")
            rows.append((os.path.join(base, path), reference))
    return rows


def load_recording(path: str) -> np.ndarray:
    """A recording as 16 kHz samples, refused by name when unreadable or longer than Whisper's window."""
    from slm_jax.data import audio
    from slm_jax.errors import UserError

    try:
        return audio.load_audio(path, max_seconds=WAV_MAX_SECONDS)
    except audio.AudioError as e:
        raise UserError(str(e)) from None


def real_speech_scores(references: Sequence[str], answers: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Per system: the WER over all recordings (word edits / reference words, slm-eval's
    normalisation) and each recording's own WER."""
    from slm_jax.inference import metrics

    return {system: {"wer": metrics.word_error_rate(references, said),
                     "per_file": [metrics.word_error_rate([r], [s]) for r, s in zip(references, said)]}
            for system, said in answers.items()}


def real_speech_table(section: Mapping[str, Any], shown: int) -> str:
    """The WER of each system on the recordings, then the reference and every system's answer for
    the first ``shown`` of them."""
    scores, names, references = section["scores"], section["names"], section["references"]
    words = sum(len(r.split()) for r in references)
    rows = [("system", f"WER ({len(references)} recordings, {words} words)")]
    rows += [(system, f"{100 * s['wer']:.1f}%") for system, s in scores.items()]
    lines = [_table(rows, left=1)]
    for i in range(min(shown, len(references))):
        lines.append(f"\n  {os.path.basename(names[i])}\n    {'reference':<30} {references[i]!r}")
        for system, said in section["answers"].items():
            lines.append(f"    {system:<30} {said[i]!r}  (WER {100 * scores[system]['per_file'][i]:.0f}%)")
    return "\n".join(lines)


def real_speech_statement(section: Mapping[str, Any]) -> str:
    """The measured WERs in words, the release's included whatever it is."""
    scores, speech = section["scores"], section["speech_system"]
    lines = []
    if speech in scores:
        wer = scores[speech]["wer"]
        lines.append(f"On real human speech the {speech} has WER {100 * wer:.1f}% ({_asr_verdict(wer)})"
                     + (": its adapter heard only espeak-ng voices saying the corpus's template sentences, so it "
                        "answers with sentences of that corpus, not with what was said (release/README.md)."
                        if wer >= 0.5 else "."))
    if WHISPER_ALONE in scores:
        lines.append(f"Whisper-base alone, its own decoder: WER {100 * scores[WHISPER_ALONE]['wer']:.1f}%; read as "
                     f"text by the same LLM (the cascade): {100 * scores[CASCADE]['wer']:.1f}%.")
    elif section.get("whisper_missing"):
        lines.append(f"Whisper-base alone and the cascade were not run: {section['whisper_missing']}.")
    return "\n".join(lines)


def run_real_speech(slm: Any, data: Any, rows: Sequence[tuple[str, str]], wavs: Sequence[str],
                    speech_system: str) -> dict[str, Any]:
    """Real recordings (``rows``: path, reference) and the user's ``wavs`` (no reference), each
    transcribed by ``slm`` (its current parameters), by Whisper-base alone and by the cascade
    (Whisper-base's transcript read by ``slm``'s LLM, asked to write it out); each in one call.
    Returns the answers, the WERs on ``rows`` and the transcripts of ``wavs``."""
    from slm_jax.data import audio
    from slm_jax.contrib.whisper_cascade.text_cascade import TextAnswerer, WhisperBaseTranscriber
    from slm_jax.weights import assets

    paths = [p for p, _ in rows] + list(wavs)
    features = [audio.log_mel_spectrogram(load_recording(p)) for p in paths]
    answers: dict[str, list[str]] = {}
    slm.audio_bucket_frames = -(-max(f.shape[0] for f in features) // 100) * 100
    answers[speech_system] = slm.generate(features, TRANSCRIBE, max_new_tokens=REAL_SPEECH_NEW_TOKENS)
    missing = None
    if assets.whisper_base_available():
        answers[WHISPER_ALONE] = WhisperBaseTranscriber().transcribe(features)
        text = TextAnswerer(slm.llm, slm.params["llm"], data.vocabulary, data.prompt_format, batch_size=len(paths),
                            max_new_tokens=REAL_SPEECH_NEW_TOKENS)
        answers[CASCADE] = text.answer(answers[WHISPER_ALONE], [TRANSCRIBE] * len(paths), ["asr_en"] * len(paths))
    else:
        missing = "the Whisper-base packages are not installed (requirements-weights.txt)"
    n = len(rows)
    references = [r for _, r in rows]
    return {"names": [p for p, _ in rows], "references": references, "speech_system": speech_system,
            "answers": {s: a[:n] for s, a in answers.items()},
            "scores": real_speech_scores(references, {s: a[:n] for s, a in answers.items()}) if n else {},
            "wavs": {p: {s: a[n + i] for s, a in answers.items()} for i, p in enumerate(wavs)},
            "whisper_missing": missing}


# --- the whole demo -------------------------------------------------------------------------------


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Runs all phases; prints the table and the statement; returns the report (also written to
    ``<out_dir>/report.json``)."""
    import gin

    from slm_jax.inference import model as inference
    from slm_jax.training import loop as train
    from slm_jax.training.objectives import CtcAlignment, NextToken
    from slm_jax.cli import common
    from slm_jax.training.step import count_params

    clock = Clock(settings.minutes)
    machine = machine_load()
    release_dir = repo_path(settings.release) if settings.release else ""
    if release_dir and not os.path.isdir(release_dir):
        print(f"note: no shipped release at {settings.release}; the results show the live run alone", flush=True)
        release_dir = ""
    real_rows = read_transcripts(repo_path(settings.real_speech)) if settings.real_speech else []
    for path in [p for p, _ in real_rows] + list(settings.wavs):
        load_recording(path)  # a bad file is refused now, not after the training
    os.makedirs(settings.out_dir, exist_ok=True)
    started = time.time()
    corpus_dir = ensure_corpus(settings)
    clock.phase("corpus", started)

    common.parse_gin(settings.gin_files, [f"CORPUS_DIR={corpus_dir!r}", *settings.gin_bindings])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    data = gin.query_parameter("train.data").scoped_configurable_fn()
    if not hasattr(data, "attach_model"):
        raise common.UserError("the demo needs a config whose train.data is CachedCorpusData "
                               f"(got {type(data).__name__})")
    mismatch = release_mismatch(release_dir, model) if release_dir else None
    if mismatch:
        print(f"note: the shipped release {settings.release} is left out: {mismatch}", flush=True)
        release_dir = ""

    examples = test_examples(corpus_dir, settings.eval_per_task)
    aligning = settings.alignment_steps
    if settings.steps is not None:  # no sizing: train() loads, encodes and compiles by itself
        steps, probe = settings.steps, {}
        print(f"plan: {aligning} alignment + {steps} next-token train steps (--steps), then evaluation on "
              f"{len(examples)} test utterances", flush=True)
    else:
        started = time.time()
        print("loading the frozen models, encoding the corpus once, measuring the train step ...", flush=True)
        probe = probe_step_seconds(model, data, settings)
        clock.phase("encoder pass + step probe", started)
        print(f"  frozen weights {probe['load_seconds']:.0f} s, encoder pass {probe['encode_seconds']:.0f} s, "
              f"compile {probe['compile_seconds']:.0f} s, {probe['step_seconds']:.2f} s per step of "
              f"{settings.batch_size}" + (f"; alignment step {probe['alignment_step_seconds']:.2f} s" if aligning else ""),
              flush=True)
        # The alignment phase: its steps and one compile per distinct speech length it meets.
        align_seconds = 0.0
        if aligning:
            align_shapes = data.shape_plan(settings.batch_size, settings.seed, aligning)["distinct_shapes"]
            align_seconds = aligning * probe["alignment_step_seconds"] + align_shapes * probe["alignment_compile_seconds"]
        # Evaluation is costed in steps at the corpus' full padded length (how it was calibrated).
        full_step = probe["seconds_per_llm_token"] * data.llm_tokens(data._ready().lengths)
        # The release's answers and its weights' load, and the real-speech section, come out of the
        # same budget: a busy machine trains fewer steps, and the release's numbers still come.
        eval_estimate = estimate_eval_seconds(
            count_generate_calls(examples, settings.eval_batch_size, release=bool(release_dir)), full_step)
        eval_estimate += probe["load_seconds"] if release_dir else 0.0
        eval_estimate += REAL_SPEECH_IN_STEPS * full_step if (real_rows or settings.wavs) else 0.0
        # The mean step over the length-bucketed batches the run will draw, and one compile per
        # distinct shape; train() also loads the weights again.
        steps = 512
        for _ in range(2):  # the shapes met depend on the step count and the step count on them
            shapes = data.shape_plan(settings.batch_size, settings.seed, aligning + steps)
            mean_step = probe["seconds_per_llm_token"] * shapes["mean_llm_tokens"]
            train_overhead = (probe["load_seconds"] + probe["compile_seconds"] * shapes["distinct_shapes"]
                              + align_seconds)
            steps = steps_for_budget(clock.left() - train_overhead, mean_step, eval_estimate, settings.min_steps)
        probe["step_seconds"] = mean_step
        finish = clock.elapsed() + train_overhead + steps * mean_step + eval_estimate
        print(f"plan: {aligning} alignment steps (~{align_seconds / 60:.1f} min), then {steps} next-token steps "
              f"(~{steps * mean_step / 60:.1f} min at {mean_step:.2f} s per mean step, "
              f"{shapes['distinct_shapes']} batch shapes to compile), then evaluation on {len(examples)} test "
              f"utterances" + (" (this run and the shipped release)" if release_dir else "")
              + (f" and {len(real_rows) + len(settings.wavs)} real recordings" if real_rows or settings.wavs else "")
              + f" (~{eval_estimate / 60:.1f} min); expected total {finish / 60:.1f} min "
              f"(budget {settings.minutes:.0f} min)", flush=True)
        if finish > clock.budget * 1.05:
            print(f"  note: this machine is slower than the budget assumes; the demo will take about "
                  f"{finish / 60:.0f} min", flush=True)

    model_dir = os.path.join(settings.out_dir, "train")
    if not settings.resume:
        shutil.rmtree(model_dir, ignore_errors=True)  # the demo's own folder: every run trains afresh
    started = time.time()
    total = aligning + steps
    phases = [(aligning, CtcAlignment()), (None, NextToken())]
    final = train.train(model_dir, data=data, steps=total, phases=phases, batch_size=settings.batch_size,
                        seed=settings.seed, learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
                        eval_every=0, checkpoint_every=settings.checkpoint_every or total,
                        log_every=max(1, min(25, total // 10)))
    train_seconds = time.time() - started
    clock.phase("training", started)
    if final.get("preempted"):  # stopped by SIGTERM: the checkpoint is saved; evaluating now would waste it
        raise common.UserError(f"training stopped by SIGTERM at step {final['step']} of {total}; rerun the same "
                               "command with --resume to continue")

    started = time.time()
    slm, step = inference.load_trained(model_dir, model, data)
    release_params, release_info = None, {}
    if release_dir:
        from slm_jax.training.checkpointing import CheckpointError

        try:
            release_params, release_info = load_release(release_dir, slm, model, data)
            release_info["directory"] = settings.release
        except (CheckpointError, ValueError) as e:
            print(f"note: the shipped release {settings.release} is left out: it does not fit this config ({e})",
                  flush=True)
    report = evaluate_all(slm, data, examples, settings, release_params=release_params)
    if release_params is not None:
        report["release_info"] = release_info
    clock.phase("evaluation", started)

    train_examples = len(data._ready().train_examples)
    run = {"steps": step, "alignment_steps": aligning, "batch_size": settings.batch_size, "train_examples": train_examples,
           "epochs": step * settings.batch_size / max(train_examples, 1), "train_seconds": train_seconds,
           "loss": final.get("loss", float("nan")), "adapter_params": count_params(slm.params["adapter"]),
           "step_seconds": probe.get("step_seconds"), "phases": clock.phases, "total_seconds": clock.elapsed(),
           "synthesizer": settings.synthesizer, "steps_asked": settings.steps is not None, "minutes": settings.minutes,
           **machine, "settings": dataclasses.asdict(settings), "model_dir": model_dir, "corpus_dir": corpus_dir}
    report["run"] = run

    if real_rows or settings.wavs:
        started = time.time()
        speech_system = "shipped release" if release_params is not None else f"run trained just now ({step} steps)"
        if release_params is not None:
            slm.params = release_params
        print(f"real speech: {len(real_rows)} recordings" + (f" and {len(settings.wavs)} of yours" if settings.wavs else "")
              + f", by the {speech_system}, Whisper-base alone and the cascade ...", flush=True)
        report["real_speech"] = run_real_speech(slm, data, real_rows, settings.wavs, speech_system)
        clock.phase("real speech", started)
    run["total_seconds"] = clock.elapsed()
    with open(os.path.join(settings.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=float)

    if "release" in report:
        print("\nsample answers (shipped release, from speech):\n" + sample_predictions(report, 1, key="release"))
    print(f"\nsample answers ({live_label(run)}, from speech):\n" + sample_predictions(report, 1 if "release" in report else 2))
    print(f"\nHeld-out test utterances ({SPEECH[settings.synthesizer]}), each column the same utterances:")
    print(results_table(report, run) + "\n")
    print(statement(report, run))
    section = report.get("real_speech")
    if section and section["references"]:
        print(f"\nReal human speech ({settings.real_speech}: read English, none synthetic, none heard in training):")
        print(real_speech_table(section, settings.real_speech_shown) + "\n")
        print(real_speech_statement(section))
    if section and section["wavs"]:
        print("\nYour recordings:")
        for path, said in section["wavs"].items():
            print(f"  {path}\n" + "\n".join(f"    {system:<30} {text!r}" for system, text in said.items()))
    print("\n" + summary(report, run))
    print(f"\ntotal {clock.elapsed() / 60:.1f} min. Full report with every prediction: "
          f"{os.path.join(settings.out_dir, 'report.json')}; try your own audio with\n"
          f"  slm-infer --gin_file={settings.gin_files[0]} "
          f"--checkpoint={settings.release if release_params is not None else model_dir} --audio=my.wav "
          f'--instruction="{TRANSCRIBE}"')
    return report
