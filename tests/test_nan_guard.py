"""The numerical guard: a step with a non-finite loss or gradient, or one whose update would leave
non-finite or exploding parameters, changes nothing but the step and the skip counters; K such
steps in a row stop slm-train with one clear line, and the last good checkpoint is kept and
resumable."""

import numpy as np
import pytest

import reliability_support as rs
from slm_jax.training import faults
from slm_jax.parallel import partitioning
from slm_jax.models.spec import sample_batch
from slm_jax.data.synthetic import SyntheticData
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer
from tiny_models import FEATURE_LENGTHS, VOCAB, model_spec


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _compiled_trainer(learning_rate: float):
    """(trainer, frozen weights, example batch) of the tiny model, its steps compiled."""
    import jax

    spec = model_spec()
    tx, schedule = make_optimizer(learning_rate=learning_rate, warmup_steps=1, total_steps=10)
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    trainer = Trainer(spec.build(), tx, schedule, mesh)
    example = sample_batch(2, FEATURE_LENGTHS)
    frozen = {name: trainer.init_frozen_randomly(name, seed, example) for name, seed in
              (("speech_encoder", 0), ("llm", 1))}
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    return trainer, frozen, example


@pytest.mark.slow
def test_a_non_finite_step_leaves_parameters_and_optimizer_state_untouched():
    trainer, frozen, example = _compiled_trainer(1e-2)
    # Batch 1 has NaN audio features, batch 2 inf ones.
    nan_data = faults.NonFiniteBatches(SyntheticData(FEATURE_LENGTHS, VOCAB), bad_batches=[1], value="nan")
    data = faults.NonFiniteBatches(nan_data, bad_batches=[2], value="inf")
    batches = data.train_batches(2, seed=0)
    state = trainer.init_state(0, example)

    state, metrics = trainer.train_step(state, frozen, trainer.place_batch(next(batches)))  # good
    assert bool(metrics["finite"]) and int(state.nonfinite_total) == 0
    for expected_streak in (1, 2):  # two bad batches
        before = _leaves((state.adapter_params, state.opt_state))
        state, metrics = trainer.train_step(state, frozen, trainer.place_batch(next(batches)))
        assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
        after = _leaves((state.adapter_params, state.opt_state))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after)), "a skipped update changed the state"
        assert (int(state.nonfinite_streak), int(state.nonfinite_total)) == (expected_streak, expected_streak)
    before = _leaves(state.adapter_params)
    state, metrics = trainer.train_step(state, frozen, trainer.place_batch(next(batches)))  # good again
    assert bool(metrics["finite"])
    assert (int(state.nonfinite_streak), int(state.nonfinite_total), int(state.step)) == (0, 2, 4)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(before, _leaves(state.adapter_params)))


@pytest.mark.slow
def test_an_update_that_would_poison_the_weights_is_skipped_though_its_loss_is_finite():
    """A learning rate of 1e30: the first update has a finite loss and gradient but would leave
    weights of ~1e29. It is skipped like a non-finite step, so no checkpoint can hold it."""
    trainer, frozen, example = _compiled_trainer(1e30)
    batches = SyntheticData(FEATURE_LENGTHS, VOCAB).train_batches(2, seed=0)
    state = trainer.init_state(0, example)
    for _ in range(2):  # warm-up step 0 has rate 0; step 1 has the full rate
        state, metrics = trainer.train_step(state, frozen, trainer.place_batch(next(batches)))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"]) and int(state.nonfinite_total) == 1
    assert max(np.abs(x).max() for x in _leaves(state.adapter_params)) < 1e3
    # The same steps with a sane rate are taken: the bound does not skip ordinary updates.
    sane, frozen, example = _compiled_trainer(1e-2)
    state = sane.init_state(0, example)
    batches = SyntheticData(FEATURE_LENGTHS, VOCAB).train_batches(2, seed=0)
    for _ in range(2):
        state, metrics = sane.train_step(state, frozen, sane.place_batch(next(batches)))
    assert bool(metrics["finite"]) and int(state.nonfinite_total) == 0


NAN_CONFIG = """
import slm_jax.training.faults
TRAIN_STEPS = 8
CHECKPOINT_EVERY = 2
train.max_nonfinite_streak = 3
train.data = @NonFiniteBatches()
NonFiniteBatches.source = @SyntheticData()
NonFiniteBatches.value = 'nan'
"""


@pytest.mark.slow
def test_k_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    # Batches are numbered from 0: steps 3, 5, 6 and 7 get NaN audio features. Step 3 is skipped
    # alone; 5-6-7 is a streak of 3, which stops the run at step 7. Checkpoint 6 falls inside the
    # streak and is not taken, so the last good checkpoint is step 4.
    gin_file = rs.write_config(tmp_path / "nan.gin", NAN_CONFIG + "NonFiniteBatches.bad_batches = [2, 4, 5, 6]\n")
    model_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    result = rs.run(rs.harness_cmd(gin_file, model_dir), SLM_HARNESS_RECORD=str(record))

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = rs.error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("slm-train: error: 3 consecutive updates were skipped")
    assert "steps 5 to 7" in errors[0] and "last good checkpoint" in errors[0] and "is step 4" in errors[0]
    assert "update skipped (1 in a row, 1 in all)" in result.stderr  # step 3, counted
    assert "update skipped (3 in a row, 4 in all)" in result.stderr
    losses = {r["step"]: float.fromhex(r["loss"]) for r in rs.read_record(record)}
    assert sorted(losses) == list(range(1, 8))
    assert [s for s, v in losses.items() if not np.isfinite(v)] == [3, 5, 6, 7]
    assert rs.step_dirs(model_dir) == [2, 4]

    # The kept checkpoint is intact: the same run with clean data resumes from it and finishes.
    before = rs.snapshot(model_dir / "4")
    clean = rs.write_config(tmp_path / "clean.gin", NAN_CONFIG + "NonFiniteBatches.bad_batches = []\n")
    resumed = rs.run(rs.harness_cmd(clean, model_dir), SLM_HARNESS_RECORD=str(record))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4 (4 batches consumed)" in resumed.stderr
    assert rs.snapshot(model_dir / "4") == before, "resuming only reads the checkpoint"
    resumed_losses = [float.fromhex(r["loss"]) for r in rs.read_record(record)[7:]]
    assert len(resumed_losses) == 4 and all(np.isfinite(resumed_losses))
    assert rs.step_dirs(model_dir)[-1] == 8
