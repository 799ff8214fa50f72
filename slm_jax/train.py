"""The training loop (T5X style): resumable, sharded, logged, preemption-safe.

``train(model_dir, ...)`` is bound by gin (see gin/*.gin) and driven by ``slm-train``. Running
it again on the same model_dir resumes from the latest complete checkpoint, including the data
position, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Iterator, Mapping, Protocol

import gin
import jax
import numpy as np

from slm_jax import checkpointing, partitioning
from slm_jax.experiment import ModelSpec, sample_batch
from slm_jax.frozen import load_frozen_params
from slm_jax.trainer import Trainer, count_params, make_optimizer, tree_bytes

log = logging.getLogger("slm_jax.train")


class DataSource(Protocol):
    feature_lengths: Mapping[str, int]

    def train_batches(self, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0,
                      num_shards: int = 1) -> Iterator[Mapping[str, np.ndarray]]: ...

    def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[Mapping[str, np.ndarray]]: ...


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (numerical guard); the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM (what a preempted TPU VM receives) into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)


class _Writers:
    """TensorBoard event files in model_dir/train and model_dir/eval (process 0 only)."""

    def __init__(self, model_dir: str):
        self._writers = {}
        if jax.process_index() == 0:
            from flax.metrics.tensorboard import SummaryWriter

            self._writers = {s: SummaryWriter(os.path.join(model_dir, s)) for s in ("train", "eval")}

    def scalars(self, split: str, step: int, values: Mapping[str, float]) -> None:
        if split in self._writers:
            for k, v in values.items():
                self._writers[split].scalar(k, v, step)
            self._writers[split].flush()

    def close(self):
        for w in self._writers.values():
            w.close()


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
) -> dict[str, Any]:
    """Trains the adapter for ``steps`` steps; returns the final metrics."""
    checkpointing.ensure_writable(model_dir)
    mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(mesh_shape))
    tx, schedule = make_optimizer(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=steps,
        weight_decay=weight_decay, clip_norm=clip_norm, name=optimizer,
    )
    slm = model.build()
    trainer = Trainer(slm, tx, schedule, mesh)
    host_batch = batch_size // jax.process_count()
    if host_batch * jax.process_count() != batch_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by {jax.process_count()} processes")
    example = sample_batch(batch_size, data.feature_lengths)

    frozen = load_frozen_params(trainer, model, example)
    if hasattr(data, "attach_model"):  # e.g. CachedCorpusData: runs the frozen encoder once, offline
        data.attach_model(slm, frozen["speech_encoder"], model)
    checkpointer = checkpointing.Checkpointer(model_dir, max_to_keep=max_to_keep)
    abstract_state = trainer.abstract_state(example)
    metadata = checkpointing.describe_state(abstract_state.adapter_params, model.frozen_sources)

    start = checkpointer.latest_step()
    if start is None:
        state = trainer.init_state(seed, example)
        batches_consumed = 0
        log.info("starting a new run in %s", model_dir)
    else:
        checkpointing.check_compatible(checkpointer.read_metadata(start), metadata, model_dir)
        state, data_position = checkpointer.restore(start, abstract_state)
        batches_consumed = int(data_position["batches_consumed"])
        log.info("resuming %s from step %d (%d batches consumed)", model_dir, start, batches_consumed)

    adapter_n = count_params(state.adapter_params)
    frozen_n = count_params(frozen)
    log.info(
        "parameters: adapter %s (%.2f%% of %s total), optimizer state %.1f MiB; mesh %s",
        f"{adapter_n:,}", 100 * adapter_n / (adapter_n + frozen_n), f"{adapter_n + frozen_n:,}",
        tree_bytes(state.opt_state) / 2**20, dict(mesh.shape),
    )
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str() or gin.config_str())

    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    trainer.compile(example, frozen_shardings)
    writers = _Writers(model_dir)
    step = int(state.step)
    save = lambda: checkpointer.save(  # noqa: E731
        step, state, {"batches_consumed": batches_consumed, "seed": seed}, {**metadata, "step": step}
    )
    last: dict[str, Any] = {}
    if step >= steps:
        log.info("already trained to step %d (>= %d steps); nothing to do", step, steps)
        return {"step": step}

    batches = data.train_batches(host_batch, seed, batches_consumed, jax.process_index(), jax.process_count())
    window_start, window_examples = time.time(), 0
    with _Preemption() as preemption, _progress(steps, step) as bar:
        while step < steps:
            batch = trainer.place_batch(next(batches))
            state, metrics = trainer.train_step(state, frozen, batch)
            step += 1
            batches_consumed += 1
            window_examples += batch_size
            streak = int(state.nonfinite_streak)
            if streak:
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, streak)
            if streak >= max_nonfinite_streak:
                raise TrainingStopped(
                    f"{streak} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                    f"stopped without saving. The last good checkpoint in {model_dir} is step "
                    f"{checkpointer.latest_step()}"
                )
            bar.update(1)
            if step % log_every == 0 or step == steps:
                elapsed = max(time.time() - window_start, 1e-9)
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last["examples_per_second"] = window_examples / elapsed
                last["skipped_updates_total"] = float(state.nonfinite_total)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                bar.write(
                    f"step {step:>6d}  loss {last['loss']:.4f}  lr {last['learning_rate']:.3e}  "
                    f"grad_norm {last['grad_norm']:.3f}  {last['examples_per_second']:.1f} examples/s"
                )
                writers.scalars("train", step, last)
                window_start, window_examples = time.time(), 0
            if eval_every and (step % eval_every == 0 or step == steps):
                ev = evaluate_loss(trainer, state, frozen, data, batch_size, eval_batches)
                bar.write(f"step {step:>6d}  eval loss {ev['loss']:.4f}  token accuracy {ev['token_accuracy']:.3f}")
                writers.scalars("eval", step, ev)
                last.update({f"eval_{k}": v for k, v in ev.items()})
            if step % checkpoint_every == 0 or step == steps:
                save()
            if preemption.requested:
                save()
                bar.write(f"SIGTERM: saved checkpoint at step {step}; exiting (run the same command to resume)")
                last["preempted"] = True
                break
    writers.close()
    checkpointer.close()
    last["step"] = step
    return last


def evaluate_loss(trainer: Trainer, state, frozen, data: DataSource, batch_size: int, num_batches: int) -> dict:
    """Teacher-forced loss and token accuracy over ``num_batches`` evaluation batches."""
    totals = {"loss_sum": 0.0, "num_target_tokens": 0.0, "correct_tokens": 0.0}
    host_batch = batch_size // jax.process_count()
    for batch in data.eval_batches(host_batch, num_batches):
        out = jax.device_get(trainer.eval_step(state, frozen, trainer.place_batch(batch)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["num_target_tokens"], 1.0)
    return {"loss": totals["loss_sum"] / n, "token_accuracy": totals["correct_tokens"] / n}
