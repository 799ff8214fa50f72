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
  4. evaluation on the held-out test split: the SLM from speech, and the cascade (the same LLM
     given the reference transcript, and given the SLM's own transcript) from text.
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
    from slm_jax.training.loop import alignment_vocabulary
    from slm_jax.training.step import Trainer, make_optimizer

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
    if settings.alignment_steps:
        trainer.alignment_vocabulary = alignment_vocabulary(data, model)
    state = trainer.init_state(settings.seed, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    batch = next(data.train_batches(settings.batch_size, settings.seed + 1))

    def timed(objective):
        """(seconds to compile + run one step, seconds per step after it) for ``objective``."""
        nonlocal state
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


def count_generate_calls(examples: Sequence[Mapping[str, Any]], batch_size: int) -> int:
    """Generation calls ``evaluate_all`` makes: SLM answers per task, then (non-ASR tasks) SLM
    transcripts and two cascade answers."""
    per_task: dict[str, int] = {}
    for ex in examples:
        per_task[ex["task"]] = per_task.get(ex["task"], 0) + 1
    calls = 0
    for task, n in per_task.items():
        batches = math.ceil(n / batch_size)
        calls += batches if task.startswith("asr_") else 4 * batches
    return calls


def evaluate_all(slm: Any, data: Any, examples: list[dict], settings: DemoSettings) -> dict[str, Any]:
    """SLM answers from speech; cascade answers from the reference and from the SLM's transcript."""
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

    report = {"slm": evaluation.evaluate(examples, from_speech(), bs, desc="SLM: answers from speech")}
    others = [ex for ex in examples if not ex["task"].startswith("asr_")]
    if others:
        transcribe = from_speech(TRANSCRIBE)
        own = {}
        for i in range(0, len(others), bs):
            chunk = others[i: i + bs]
            own.update(zip([e["id"] for e in chunk], transcribe(chunk)))
        text = TextAnswerer(slm.llm, slm.params["llm"], data.vocabulary, data.prompt_format, batch_size=bs,
                            max_new_tokens=settings.max_new_tokens)
        report["cascade_reference"] = evaluation.evaluate(
            others, evaluation.fixed_batch(lambda b: text.answer([e["text"] for e in b], [e["instruction"] for e in b]),
                                           bs), bs, desc="cascade: reference transcript")
        report["cascade_own"] = evaluation.evaluate(
            others, evaluation.fixed_batch(lambda b: text.answer([own[e["id"]] for e in b],
                                                                 [e["instruction"] for e in b]), bs),
            bs, desc="cascade: SLM transcript")
        report["own_transcripts"] = own
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


def results_table(report: Mapping[str, Any]) -> str:
    """Rows: tasks; columns: metric, the SLM from speech, the cascade from the reference
    transcript and from the SLM's own transcript."""
    from slm_jax.inference.evaluation import headline

    header = ("task", "n", "metric", "SLM (speech)", "cascade (reference text)", "cascade (SLM transcript)")
    rows = [header]
    for task, scores in report["slm"]["tasks"].items():
        metric, _ = headline(scores)
        label = {"wer": "WER", "bleu": "BLEU", "accuracy": "accuracy"}[metric]
        rows.append((task + (" (zero-shot)" if task.startswith("zeroshot_") else ""), str(int(scores["examples"])),
                     label, _cell(scores),
                     _cell(report.get("cascade_reference", {}).get("tasks", {}).get(task)),
                     _cell(report.get("cascade_own", {}).get("tasks", {}).get(task))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def statement(report: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """What was measured, in words, good or bad."""
    tasks = report["slm"]["tasks"]
    lines = [
        f"Measured: the adapter ({run['adapter_params']:,} parameters; encoder and LLM frozen) trained for "
        f"{run['steps']} steps of {run['batch_size']} ({run.get('alignment_steps', 0)} of them CTC alignment; "
        f"{run['steps'] * run['batch_size']:,} examples, "
        f"{run['epochs']:.1f} passes over {run['train_examples']:,} training utterances) in "
        f"{run['train_seconds'] / 60:.1f} min; final training loss {run.get('loss', float('nan')):.3f}.",
        f"Evaluated on {sum(int(s['examples']) for s in tasks.values())} held-out test utterances "
        f"({SPEECH[run.get('synthesizer', 'espeak')]}; sentences of the same grammar as training, never the same "
        "example).",
    ]
    if "asr_en" in tasks:
        wer = tasks["asr_en"]["wer"]
        verdict = ("usable transcripts" if wer < 0.15 else "partly right transcripts" if wer < 0.5
                   else "the adapter has not learned to transcribe yet in this run")
        lines.append(f"English ASR: WER {100 * wer:.1f}% ({verdict}).")
    zero = {t: s for t, s in tasks.items() if t.startswith("zeroshot_")}
    if zero:
        lines.append("Zero-shot (instructions never seen in training): " + ", ".join(
            f"{t[len('zeroshot_'):]} {_cell(s)}" for t, s in sorted(zero.items())) + ".")
    if "cascade_reference" in report:
        lines.append("The cascade columns show this same LLM reading text: given the reference transcript it is "
                     "what a perfect recogniser would allow; given the SLM's own transcript it is a two-stage "
                     "pipeline. Its LLM was never taught the corpus' short answer format (the adapter was, "
                     "through the speech), so its exact-match accuracy is a strict, zero-shot baseline.")
    if run["steps"] < 1000:
        lines.append(f"This is a short CPU run ({run['steps']} steps); numbers improve with more steps "
                     "(release/README.md has the command for a 1,500-step run and its status).")
    return "\n".join(lines)


def sample_predictions(report: Mapping[str, Any], per_task: int = 2) -> str:
    lines = []
    for task, rows in report["slm"]["predictions"].items():
        for row in rows[:per_task]:
            lines.append(f"  {task:<26} {row['instruction'][:40]!r:<44} ref {row['reference']!r}  ->  "
                         f"{row['prediction'][:80]!r}")
    return "\n".join(lines)


# --- the whole demo -------------------------------------------------------------------------------


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Runs all phases; prints the table and the statement; returns the report (also written to
    ``<out_dir>/report.json``)."""
    import gin

    from slm_jax.inference import model as inference
    from slm_jax.training import loop as train
    from slm_jax.cli import common
    from slm_jax.training.step import count_params

    clock = Clock(settings.minutes)
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
        eval_estimate = estimate_eval_seconds(count_generate_calls(examples, settings.eval_batch_size), full_step)
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
              f"utterances (~{eval_estimate / 60:.1f} min); expected total {finish / 60:.1f} min "
              f"(budget {settings.minutes:.0f} min)", flush=True)
        if finish > clock.budget * 1.05:
            print(f"  note: this machine is slower than the budget assumes; the demo will take about "
                  f"{finish / 60:.0f} min", flush=True)

    model_dir = os.path.join(settings.out_dir, "train")
    if not settings.resume:
        shutil.rmtree(model_dir, ignore_errors=True)  # the demo's own folder: every run trains afresh
    started = time.time()
    total = aligning + steps
    final = train.train(model_dir, data=data, steps=total, alignment_steps=aligning, batch_size=settings.batch_size,
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
    report = evaluate_all(slm, data, examples, settings)
    clock.phase("evaluation", started)

    train_examples = len(data._ready().train_examples)
    run = {"steps": step, "alignment_steps": aligning, "batch_size": settings.batch_size, "train_examples": train_examples,
           "epochs": step * settings.batch_size / max(train_examples, 1), "train_seconds": train_seconds,
           "loss": final.get("loss", float("nan")), "adapter_params": count_params(slm.params["adapter"]),
           "step_seconds": probe.get("step_seconds"), "phases": clock.phases, "total_seconds": clock.elapsed(),
           "synthesizer": settings.synthesizer,
           "settings": dataclasses.asdict(settings), "model_dir": model_dir, "corpus_dir": corpus_dir}
    report["run"] = run
    with open(os.path.join(settings.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=float)

    print("\nsample answers (SLM, from speech):\n" + sample_predictions(report))
    print("\n" + results_table(report) + "\n")
    print(statement(report, run))
    print(f"\ntotal {clock.elapsed() / 60:.1f} min. Full report with every prediction: "
          f"{os.path.join(settings.out_dir, 'report.json')}; try your own audio with\n"
          f"  slm-infer --gin_file={settings.gin_files[0]} --checkpoint={model_dir} --audio=my.wav "
          f'--instruction="{TRANSCRIBE}"')
    return report
