"""The training loop (T5X style): resumable, sharded, logged, preemption-safe.

``train(model_dir, ...)`` is bound by gin (see gin/) and driven by ``slm-train``. Running it again
on the same model_dir resumes from the latest complete checkpoint, including the data position,
so a resumed run sees exactly the batches an uninterrupted run would have seen.

A run is a schedule of phases ``[(steps, objective), ...]`` (slm_jax/training/objectives.py); the
last phase's steps may be None: the rest of ``train.steps``. The default is the paper's: next-token
steps only.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Iterator, Mapping, Protocol, Sequence

import gin
import jax
import numpy as np

from slm_jax.errors import UserError
from slm_jax.models.spec import ModelSpec, sample_batch
from slm_jax.parallel import partitioning
from slm_jax.training import checkpointing, objectives, paths
from slm_jax.training.augment import SpeechMasking
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer, count_params, tree_bytes
from slm_jax.weights.frozen import load_frozen_params

log = logging.getLogger("slm_jax.training.loop")


class DataSource(Protocol):
    feature_lengths: Mapping[str, int]

    def train_batches(self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0,
                      num_shards: int = 1) -> Iterator[Mapping[str, np.ndarray]]: ...

    def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[Mapping[str, np.ndarray]]: ...


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (numerical guard); the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM (what a preempted TPU VM receives) into a flag checked between steps.

    Installed for the whole of ``train`` so that a SIGTERM during start-up or compilation is
    not fatal either: the run then stops at its first check without losing anything.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def _handle(self, signum, frame):
        self._flag = True

    @property
    def requested(self) -> bool:
        """True on every process once any process got SIGTERM (they must all save together)."""
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._flag))))

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)


class _Writers:
    """TensorBoard event files in model_dir/train and model_dir/eval (process 0 only)."""

    def __init__(self, model_dir: str):
        self._files = {}
        if jax.process_index() == 0:
            from slm_jax.training.event_files import EventFile

            self._files = {s: EventFile(paths.join(model_dir, s)) for s in ("train", "eval")}

    def scalars(self, split: str, step: int, values: Mapping[str, float]) -> None:
        if split in self._files:
            self._files[split].scalars(step, values)

    def close(self):
        for f in self._files.values():
            f.close()


Phase = tuple  # (steps or None, objective)
PAPER_PHASES: tuple[Phase, ...] = ((None, objectives.NextToken()),)


def resolve_phases(phases: Sequence[Phase], steps: int) -> list[tuple[int, int, Any]]:
    """[(steps, objective)] -> [(first step, end step, objective)] covering [0, steps); phases of
    0 steps are left out. Only the last phase may have None steps (the rest of the run)."""
    if not phases:
        raise UserError("train.phases is empty: give at least one (steps, objective) pair")
    spans, start = [], 0
    for i, phase in enumerate(phases):
        if not (isinstance(phase, (tuple, list)) and len(phase) == 2 and hasattr(phase[1], "loss")):
            raise UserError(f"train.phases[{i}] must be (steps, objective), got {phase!r}")
        length, objective = phase
        last = i == len(phases) - 1
        if length is None and not last:
            raise UserError(f"train.phases[{i}]: only the last phase may run for the rest of the steps (None)")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
            raise UserError(f"train.phases[{i}] steps must be a non-negative integer or None, got {length!r}")
        end = steps if length is None else start + length
        if end > steps:
            raise UserError(f"train.phases need {end} steps up to phase {i}, more than train.steps ({steps})")
        if last and end < steps:
            raise UserError(f"train.phases cover {end} of train.steps ({steps}): give the last phase None steps "
                            "(the rest of the run) or more steps")
        if end > start:
            spans.append((start, end, objective))
        start = end
    return spans


def _check_settings(**values: int) -> None:
    """Rejects settings that would only fail later (a modulo by zero after the first step)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"train.{name} must be a non-negative integer, got {value!r}")
    for name in ("steps", "batch_size", "max_nonfinite_streak"):
        if values[name] < 1:
            raise UserError(f"train.{name} must be at least 1, got {values[name]}")


@gin.configurable(denylist=["model_dir"])
def train(
    model_dir: str,
    *,
    model: ModelSpec = gin.REQUIRED,
    data: DataSource = gin.REQUIRED,
    steps: int = gin.REQUIRED,
    batch_size: int = 8,
    seed: int = 0,
    mesh_shape: str = "data=-1",
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    optimizer: str = "adamw",
    log_every: int = 10,
    eval_every: int = 100,
    eval_batches: int = 4,
    checkpoint_every: int = 100,
    max_to_keep: int = 3,
    max_nonfinite_streak: int = 10,
    phases: Sequence[Phase] = PAPER_PHASES,
    restart_schedule_each_phase: bool = False,
    speech_masking: SpeechMasking | None = None,
    init_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Trains the adapter for ``steps`` steps; returns the final metrics.

    ``phases`` [(steps, objective)]: what each stretch of the run minimises (module docstring).
    One optimizer spans them; its learning-rate schedule spans them too, or, with
    ``restart_schedule_each_phase``, starts over (warm-up, cosine decay) at each phase, which
    otherwise begins at the previous phase's decayed rate.
    ``speech_masking`` (slm_jax/training/augment.py) masks spans of the front end's rows in training steps.
    ``init_checkpoint`` (a model or step directory of a run of the same model and optimizer, or a
    release) starts a new run from that adapter: step 0, fresh optimizer state and schedule, the
    data stream from its start. A ``model_dir`` that already holds checkpoints resumes instead.

    ``log_every``, ``eval_every`` and ``checkpoint_every`` may be 0 (never; the last step is still
    checkpointed). After ``max_nonfinite_streak`` consecutive skipped updates (a non-finite loss,
    gradient or result: slm_jax/training/step.py) the run raises ``TrainingStopped``.
    """
    _check_settings(steps=steps, batch_size=batch_size, log_every=log_every, eval_every=eval_every,
                    checkpoint_every=checkpoint_every, max_nonfinite_streak=max_nonfinite_streak,
                    max_to_keep=max_to_keep)
    spans = resolve_phases(phases, steps)
    from slm_jax.training.run_lock import RunLock  # one training run per model_dir (process 0 holds it)

    with RunLock(model_dir), _Preemption() as preemption:
        return _train(model_dir, preemption, model=model, data=data, steps=steps, batch_size=batch_size,
                      seed=seed, mesh_shape=mesh_shape, learning_rate=learning_rate, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, clip_norm=clip_norm, optimizer=optimizer, log_every=log_every,
                      eval_every=eval_every, eval_batches=eval_batches, checkpoint_every=checkpoint_every,
                      max_to_keep=max_to_keep, max_nonfinite_streak=max_nonfinite_streak, spans=spans,
                      restart_schedule_each_phase=restart_schedule_each_phase, speech_masking=speech_masking,
                      init_checkpoint=init_checkpoint)


def _train(model_dir, preemption, *, model, data, steps, batch_size, seed, mesh_shape, learning_rate, warmup_steps,
           weight_decay, clip_norm, optimizer, log_every, eval_every, eval_batches, checkpoint_every, max_to_keep,
           max_nonfinite_streak, spans, restart_schedule_each_phase, speech_masking,
           init_checkpoint) -> dict[str, Any]:
    try:
        mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(mesh_shape))
    except ValueError as e:  # a configuration mistake, named in one line
        raise UserError(f"train.mesh_shape: {e}") from None
    restarts = tuple(start for start, _, _ in spans[1:]) if restart_schedule_each_phase else ()
    tx, schedule = make_optimizer(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=steps,
        weight_decay=weight_decay, clip_norm=clip_norm, name=optimizer, restarts=restarts,
    )
    slm = model.build()
    trainer = Trainer(slm, tx, schedule, mesh, speech_masking=speech_masking, masking_seed=seed)
    host_batch = batch_size // jax.process_count()
    if host_batch * jax.process_count() != batch_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by {jax.process_count()} processes")
    example = sample_batch(batch_size, data.feature_lengths)
    abstract_state = trainer.abstract_state(example)
    metadata = checkpointing.describe_state(
        abstract_state.adapter_params, model.frozen_sources, model.speech_front_end,
        frozen_configs=checkpointing.frozen_configs(model),
        settings=dict(steps=steps, batch_size=batch_size, seed=seed, learning_rate=learning_rate,
                      warmup_steps=warmup_steps, weight_decay=weight_decay, clip_norm=clip_norm, optimizer=optimizer))

    # Everything that can refuse the run happens before anything is written to model_dir (an
    # existing run stays byte for byte as it was) and before the slow parts (frozen weights,
    # compilation): a checkpoint of another configuration, a read-only or too full disk.
    existing = checkpointing.complete_steps(model_dir)
    start = existing[-1] if existing else None
    restored = None
    if start is not None:
        checkpointing.check_compatible(checkpointing.read_metadata(model_dir, start), metadata, model_dir)
        if start >= steps:
            log.info("already trained to step %d (>= %d steps); nothing to do", start, steps)
            return {"step": start}
        reader = checkpointing.Checkpointer(model_dir, read_only=True)
        try:
            restored = reader.restore(start, abstract_state)  # a damaged checkpoint fails here
        finally:
            reader.close()
    elif init_checkpoint:
        # Any adapter of the same shapes may initialise a run, also one that read another front end
        # (e.g. another LLM-token layout of the same Whisper decoder): the run then learns this one.
        warm = checkpointing.restore_checkpoint(init_checkpoint, abstract_state, model.frozen_sources, None)
        log.info("new run initialised from the adapter of %s step %d", warm.directory, warm.step)
        warm_front_end = warm.metadata.get("speech_front_end", "encoder")
        if warm_front_end != model.speech_front_end:
            log.warning("the initial adapter read %r outputs; this run trains it on %r outputs",
                        warm_front_end, model.speech_front_end)
        metadata = {**metadata, "initialized_from": {"directory": warm.directory, "step": warm.step}}
        restored = (trainer.warm_start_state(warm.state.adapter_params, example), {"batches_consumed": 0})
    checkpointing.ensure_writable(
        model_dir, checkpointing.bytes_needed(tree_bytes(abstract_state), max_to_keep, len(existing)))

    frozen = load_frozen_params(trainer, model, example)
    if hasattr(data, "attach_model"):  # e.g. CachedCorpusData: runs the frozen encoder once, offline
        data.attach_model(slm, frozen["speech_encoder"], model)
    # Objectives bound to what only this run knows (e.g. the transcripts' sub-vocabulary).
    bound = {}
    for _, _, objective in spans:
        if objective not in bound:
            bound[objective] = objective.for_run(data, model)
    spans = [(start, end, bound[objective]) for start, end, objective in spans]
    metadata = {**metadata, **objectives.run_metadata(bound.values())}
    checkpointer = checkpointing.Checkpointer(model_dir, max_to_keep=max_to_keep)
    try:
        return _loop(model_dir, preemption, trainer, checkpointer, frozen, example, metadata, restored, data=data, steps=steps, batch_size=batch_size, host_batch=host_batch, seed=seed,
                     log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
                     checkpoint_every=checkpoint_every, max_nonfinite_streak=max_nonfinite_streak,
                     spans=spans)
    finally:
        checkpointer.close()




def _loop(model_dir, preemption, trainer, checkpointer, frozen, example, metadata, restored, *,
          data, steps, batch_size, host_batch, seed, log_every, eval_every, eval_batches, checkpoint_every,
          max_nonfinite_streak, spans) -> dict[str, Any]:
    if restored is None:
        state = trainer.init_state(seed, example)
        batches_consumed = 0
        log.info("starting a new run in %s", model_dir)
    else:
        state, data_position = restored
        batches_consumed = int(data_position["batches_consumed"])
        if int(state.step):  # else a warm start (init_checkpoint), already logged
            log.info("resuming %s from step %d (%d batches consumed)", model_dir, int(state.step), batches_consumed)

    adapter_n = count_params(state.adapter_params)
    frozen_n = count_params(frozen)
    log.info(
        "parameters: adapter %s (%.2f%% of %s total), optimizer state %.1f MiB; mesh %s",
        f"{adapter_n:,}", 100 * adapter_n / (adapter_n + frozen_n), f"{adapter_n + frozen_n:,}",
        tree_bytes(state.opt_state) / 2**20, dict(trainer.mesh.shape),
    )
    if jax.process_index() == 0:
        with paths.open(paths.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str() or gin.config_str())

    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    trainer.compile(example, frozen_shardings, tuple({objective: None for _, _, objective in spans}))
    phase_ends = {end for _, end, _ in spans}

    def objective_at(step: int):
        return next(objective for start, end, objective in spans if start <= step < end)

    step = int(state.step)

    def save():
        if checkpointer.last_saved != step:
            checkpointer.save(step, state, {"batches_consumed": batches_consumed, "seed": seed},
                              {**metadata, "step": step})

    last: dict[str, Any] = {}
    batches = data.train_batches(host_batch, seed, batches_consumed, jax.process_index(), jax.process_count())
    window_start, window_examples = time.time(), 0
    # The logged loss is the mean over the log window's good steps, not the last step's: one
    # batch's loss swings with its task mix (more so with length-grouped batches).
    window_loss, window_steps = 0.0, 0
    checkpoint_due = False
    writers = _Writers(model_dir)
    try:
        with _progress(steps, step) as bar:
            while step < steps:
                if preemption.requested:
                    save()
                    bar.write(f"SIGTERM: saved checkpoint at step {step}; exiting (run the same command to resume)")
                    last["preempted"] = True
                    break
                objective = objective_at(step)
                batch = trainer.place_batch(next(batches), objective)
                state, metrics = trainer.train_step(state, frozen, batch, objective)
                step += 1
                batches_consumed += 1
                window_examples += batch_size
                streak = int(state.nonfinite_streak)
                if not streak:
                    window_loss, window_steps = window_loss + metrics["loss"], window_steps + 1  # stays on device
                if streak:
                    log.warning("step %d: non-finite or exploding update skipped (%d in a row, %d in all)",
                                step, streak, int(state.nonfinite_total))
                if streak >= max_nonfinite_streak:
                    saved = (f"the last good checkpoint in {model_dir} is step {checkpointer.last_saved}"
                             if checkpointer.last_saved is not None else f"no checkpoint was saved in {model_dir}")
                    raise TrainingStopped(
                        f"{streak} consecutive updates were skipped as non-finite or exploding (steps "
                        f"{step - streak + 1} to {step}); stopped without saving them; {saved}. Check the data of "
                        "those steps or lower the learning rate")
                bar.update(1)
                # Also at the end of each phase: a window's mean loss must be of one objective.
                if (log_every and step % log_every == 0) or step in phase_ends:
                    elapsed = max(time.time() - window_start, 1e-9)
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if window_steps:
                        last["loss"] = float(window_loss) / window_steps
                    last["examples_per_second"] = window_examples / elapsed
                    last["skipped_updates_total"] = float(state.nonfinite_total)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                    label = "loss" if objective.name == "next_token" else f"{objective.name} loss"
                    ctc = f"  ctc loss {last['alignment_loss']:.4f}" if "alignment_loss" in last else ""
                    bar.write(
                        f"step {step:>6d}  {label} {last['loss']:.4f}{ctc}  lr {last['learning_rate']:.3e}  "
                        f"grad_norm {last['grad_norm']:.3f}  {last['examples_per_second']:.1f} examples/s"
                    )
                    writers.scalars("train" if objective.name == "next_token" else f"train_{objective.name}", step, last)
                    window_start, window_examples = time.time(), 0
                    window_loss, window_steps = 0.0, 0
                if eval_every and (step % eval_every == 0 or step == steps):
                    ev = evaluate_loss(trainer, state, frozen, data, batch_size, eval_batches)
                    bar.write(f"step {step:>6d}  eval loss {ev['loss']:.4f}  token accuracy {ev['token_accuracy']:.3f}")
                    writers.scalars("eval", step, ev)
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                checkpoint_due |= bool(checkpoint_every and step % checkpoint_every == 0) or step == steps
                # Not in the middle of a non-finite streak: the checkpoint a stopped run points to
                # must come from a step whose update was good. It is taken at the next good step.
                if checkpoint_due and (not streak or step == steps):
                    save()
                    checkpoint_due = False
    finally:
        writers.close()
    last["step"] = step
    last["skipped_updates_total"] = float(state.nonfinite_total)
    return last


def evaluate_loss(trainer: Trainer, state, frozen, data: DataSource, batch_size: int, num_batches: int) -> dict:
    """Teacher-forced loss and token accuracy over ``num_batches`` evaluation batches."""
    totals = {"loss_sum": 0.0, "num_target_tokens": 0.0, "correct_tokens": 0.0}
    host_batch = batch_size // jax.process_count()
    for batch in data.eval_batches(host_batch, num_batches):
        out = jax.device_get(trainer.eval_step(state, frozen, trainer.place_batch(batch, objectives.NextToken())))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["num_target_tokens"], 1.0)
    return {"loss": totals["loss_sum"] / n, "token_accuracy": totals["correct_tokens"] / n}
