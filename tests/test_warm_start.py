"""train.init_checkpoint: a new run that starts from another run's adapter (fine-tuning)."""

import jax
import numpy as np
import pytest

from slm_jax.training import checkpointing
from slm_jax.training.loop import train
from slm_jax.training.objectives import CtcAlignment, NextToken
from slm_jax.training.step import Trainer

from tiny_models import model_spec
from toy_cached_data import toy_source


def align_then_next(steps):
    return [(steps, CtcAlignment()), (None, NextToken())]

SETTINGS = dict(batch_size=8, eval_every=0, log_every=1, learning_rate=1e-3, warmup_steps=1)


def _first_states(monkeypatch):
    """Records the state each train() call's first step starts from."""
    seen = []
    original = Trainer.train_step

    def spy(self, state, frozen, batch, objective=NextToken()):
        if not seen or seen[-1] is None:
            seen[-1:] = [jax.device_get(state)]
        return original(self, state, frozen, batch, objective)

    monkeypatch.setattr(Trainer, "train_step", spy)
    return seen


def _restored_adapter(model_dir):
    directory, step = checkpointing.find_checkpoint_dir(model_dir)
    reader = checkpointing.Checkpointer(directory, read_only=True)
    try:
        return jax.device_get(reader._manager.restore(step)["state"]["adapter_params"])
    finally:
        reader.close()


@pytest.mark.slow
def test_a_new_run_starts_from_the_given_adapter_with_fresh_optimizer_state(tmp_path, monkeypatch):
    source = str(tmp_path / "source")
    train(source, model=model_spec(llm="llama"), data=toy_source(), steps=3, phases=align_then_next(3),
          checkpoint_every=3, **SETTINGS)
    trained = _restored_adapter(source)

    seen = _first_states(monkeypatch)
    seen.append(None)
    tuned = str(tmp_path / "tuned")
    result = train(tuned, model=model_spec(llm="llama"), data=toy_source(), steps=2, phases=align_then_next(2),
                   checkpoint_every=2, init_checkpoint=source, **SETTINGS)
    start = seen[0]
    assert int(start.step) == 0 and result["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, start.adapter_params, trained)
    moments = [np.asarray(x) for x in jax.tree.leaves(start.opt_state) if np.ndim(x) > 0]
    assert moments and all(not m.any() for m in moments)  # AdamW's mu and nu start at zero again
    metadata = checkpointing.read_metadata(tuned, 2)
    assert metadata["initialized_from"] == {"directory": source, "step": 3}

    # A run that already has checkpoints resumes from them; init_checkpoint no longer applies.
    seen.append(None)
    train(tuned, model=model_spec(llm="llama"), data=toy_source(), steps=3, phases=align_then_next(3),
          checkpoint_every=3, init_checkpoint=source, **SETTINGS)
    assert int(seen[1].step) == 2


@pytest.mark.slow
def test_a_missing_or_foreign_init_checkpoint_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint at .*nowhere"):
        train(str(tmp_path / "a"), model=model_spec(llm="llama"), data=toy_source(), steps=1, phases=align_then_next(1),
              init_checkpoint=str(tmp_path / "nowhere"), **SETTINGS)
    assert not (tmp_path / "a").exists()
    other = str(tmp_path / "one_layer")
    train(other, model=model_spec(llm="llama", num_layers=1), data=toy_source(), steps=1, phases=align_then_next(1), checkpoint_every=1,
          **SETTINGS)
    with pytest.raises(checkpointing.CheckpointError, match="different configuration"):
        train(str(tmp_path / "b"), model=model_spec(llm="llama"), data=toy_source(), steps=1, phases=align_then_next(1),
              init_checkpoint=other, **SETTINGS)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_an_adapter_of_another_front_end_may_initialise_a_run_but_not_resume_one(tmp_path, monkeypatch, caplog):
    """A warm start is only an initialisation: an adapter that read another front end's outputs
    (e.g. Whisper's LLM tokens laid out per Whisper token) may start a run on this one, with a
    warning; resuming it as if nothing changed is refused."""
    from slm_jax.models.spec import ModelSpec

    source = str(tmp_path / "source")
    train(source, model=model_spec(llm="llama"), data=toy_source(), steps=1, phases=align_then_next(1), checkpoint_every=1,
          **SETTINGS)
    monkeypatch.setattr(ModelSpec, "speech_front_end", property(lambda self: "another_front_end"))
    tuned = str(tmp_path / "tuned")
    with caplog.at_level("WARNING"):
        train(tuned, model=model_spec(llm="llama"), data=toy_source(), steps=1, phases=align_then_next(1),
              checkpoint_every=1, init_checkpoint=source, **SETTINGS)
    assert "read 'encoder' outputs; this run trains it on 'another_front_end'" in caplog.text
    assert checkpointing.read_metadata(tuned, 1)["speech_front_end"] == "another_front_end"
    with pytest.raises(checkpointing.CheckpointError, match="'encoder' outputs.*'another_front_end'"):
        train(source, model=model_spec(llm="llama"), data=toy_source(), steps=2, phases=align_then_next(2), **SETTINGS)
