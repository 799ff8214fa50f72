"""The CTC alignment objective: sub-vocabulary, feasibility, the step, and its place in a run's phases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.training import alignment
from slm_jax.parallel import partitioning
from slm_jax.models.slm import SLM
from slm_jax.errors import UserError
from slm_jax.training.loop import train
from slm_jax.training.objectives import CtcAlignment, NextToken, NextTokenWithAlignment
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer

from tiny_models import model_spec
from toy_cached_data import WORDS, toy_source


def test_vocabulary_maps_ids_to_classes_and_refuses_unknown_tokens():
    vocab = alignment.AlignmentVocabulary([7, 3, 7, 11], vocab_size=16)
    assert len(vocab) == 3 and vocab.ids.tolist() == [3, 7, 11]
    tokens = np.array([[11, 3, 0], [7, 7, 5]])
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    assert vocab.to_classes(tokens, mask).tolist() == [[3, 1, 0], [2, 2, 0]]
    with pytest.raises(ValueError, match=r"\[0, 5\] are not"):
        vocab.to_classes(tokens, np.ones_like(mask))
    with pytest.raises(ValueError, match="empty"):
        alignment.AlignmentVocabulary([], vocab_size=16)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        alignment.AlignmentVocabulary([3, 16], vocab_size=16)


@pytest.mark.slow
def test_rows_whose_transcript_cannot_fit_their_frames_are_left_out():
    labels = jnp.array([[1, 2, 0], [1, 1, 2], [1, 2, 3]])
    label_mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    # Row 1 needs 4 frames (a blank between the repeated 1s) and has 3; row 2 needs 3 and has 3.
    frames = jnp.array([2, 3, 3])
    assert alignment.ctc_feasible(frames, labels, label_mask).tolist() == [True, False, True]
    logits = jax.random.normal(jax.random.key(0), (3, 4, 4))
    frame_mask = (jnp.arange(4)[None, :] < frames[:, None]).astype(jnp.int32)
    loss_sum, tokens = alignment.ctc_alignment_loss(logits, frame_mask, labels, label_mask)
    assert float(tokens) == 5.0  # rows 0 and 2
    only_fitting, _ = alignment.ctc_alignment_loss(logits[::2], frame_mask[::2], labels[::2], label_mask[::2])
    np.testing.assert_allclose(float(loss_sum), float(only_fitting), rtol=1e-6)
    assert np.isfinite(float(loss_sum))


def test_greedy_decode_merges_repeats_and_drops_blanks():
    vocab = alignment.AlignmentVocabulary([40, 50], vocab_size=64)
    best = [0, 1, 1, 0, 1, 2, 2, 0]  # classes: blank, 40, 40, blank, 40, 50, 50, blank
    logits = np.eye(3)[best][None]
    assert alignment.greedy_decode(logits, np.ones((1, 8)), vocab) == [[40, 40, 50]]


ALIGN_THEN_NEXT = lambda n: [(n, CtcAlignment()), (None, NextToken())]  # noqa: E731


def _trainer(data, llm="llama"):
    spec = model_spec(llm=llm)
    tx, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=300)
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    return Trainer(spec.build(), tx, schedule, mesh), spec, CtcAlignment().for_run(data, spec)


@pytest.mark.parametrize("llm", ["llama", "t5"])
@pytest.mark.slow
def test_alignment_steps_learn_the_transcript_and_leave_frozen_weights_alone(llm):
    from slm_jax.models.spec import sample_batch

    data = toy_source()
    trainer, spec, ctc = _trainer(data, llm)
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: trainer.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    before = jax.tree.map(np.asarray, frozen)
    state = trainer.init_state(0, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    batch = data.batch(data.train_examples[:5])  # one example of each transcript
    placed = trainer.place_batch(batch, ctc)
    assert set(placed) == {"speech_hidden", "speech_mask", "transcript_tokens", "transcript_mask"}
    losses = []
    for _ in range(300):
        state, metrics = trainer.train_step(state, frozen, placed, ctc)
        losses.append(float(metrics["loss"]))
        assert float(metrics["num_target_tokens"]) == sum(len(w) for w in WORDS)  # every row fits
    assert losses[-1] < 0.1 * losses[0], losses[::50]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen))
    # What the adapter now 'says' is the transcript.
    from slm_jax.models.front_end import SpeechRows

    logits, frame_mask = trainer.model.apply(
        {"params": {"adapter": state.adapter_params, "llm": frozen["llm"]}},
        SpeechRows(placed["speech_hidden"], placed["speech_mask"]), jnp.asarray(ctc.vocabulary.ids),
        method=alignment.adapter_ctc_logits)
    decoded = alignment.greedy_decode(np.asarray(logits), np.asarray(frame_mask), ctc.vocabulary)
    assert [data.vocabulary.decode(d) for d in decoded] == WORDS


def test_next_token_batches_carry_no_transcripts():
    data = toy_source()
    trainer, _, _ = _trainer(data)
    batch = data.batch(data.train_examples[:4])
    assert "transcript_tokens" in batch
    assert not {"transcript_tokens", "transcript_mask"} & set(trainer.place_batch(batch, NextToken()))


@pytest.mark.slow
def test_joint_next_token_step_adds_the_weighted_ctc_loss():
    """alignment_weight w: a next-token step's loss and gradients are the next-token ones plus w
    times the alignment step's, on the same batch and parameters."""
    from slm_jax.models.spec import sample_batch

    data = toy_source()
    trainer, spec, ctc = _trainer(data)
    joint = NextTokenWithAlignment(0.5, ctc)
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: trainer.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    params = trainer.init_state(0, example).adapter_params
    batch = data.batch(data.train_examples[:4])
    joint_batch = trainer.place_batch(batch, joint)
    assert {"transcript_tokens", "transcript_mask", "target_tokens"} <= set(joint_batch)
    (loss, metrics), grads = trainer.loss_and_grads(params, frozen, joint_batch, joint)
    (nt_loss, _), nt_grads = trainer.loss_and_grads(params, frozen, trainer.place_batch(batch, NextToken()), NextToken())
    (ctc_loss, _), ctc_grads = trainer.loss_and_grads(params, frozen, trainer.place_batch(batch, ctc), ctc)
    assert float(ctc_loss) > 0.1
    np.testing.assert_allclose(float(loss), float(nt_loss) + 0.5 * float(ctc_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(nt_loss), rtol=1e-5)  # what is logged
    np.testing.assert_allclose(float(metrics["alignment_loss"]), float(ctc_loss), rtol=1e-5)
    jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, a + 0.5 * b, rtol=1e-4, atol=1e-6),
                 grads, nt_grads, ctc_grads)


@pytest.mark.slow
def test_train_with_the_joint_objective_logs_both_losses(tmp_path):
    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=3, batch_size=8,
                   phases=[(1, CtcAlignment()), (None, NextTokenWithAlignment(0.3))], eval_every=0, log_every=1,
                   checkpoint_every=0, learning_rate=1e-3, warmup_steps=1)
    assert result["step"] == 3 and np.isfinite(result["loss"]) and result["alignment_loss"] > 0
    with pytest.raises(ValueError, match="alignment_weight must be >= 0"):
        NextTokenWithAlignment(-1.0)


@pytest.mark.slow
def test_train_runs_the_alignment_steps_first_then_the_next_token_loss(tmp_path, monkeypatch):
    objectives = []
    original = Trainer.train_step

    def spy(self, state, frozen, batch, objective=NextToken()):
        objectives.append(objective.name)
        return original(self, state, frozen, batch, objective)

    monkeypatch.setattr(Trainer, "train_step", spy)
    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=5, batch_size=8,
                   phases=ALIGN_THEN_NEXT(3), eval_every=0, log_every=1, checkpoint_every=0, learning_rate=1e-3,
                   warmup_steps=1)
    assert objectives == ["alignment"] * 3 + ["next_token"] * 2
    assert result["step"] == 5 and np.isfinite(result["loss"])
    # The checkpoint records the sub-vocabulary, so its CTC head can be read without the corpus.
    from slm_jax.training import checkpointing

    metadata = checkpointing.read_metadata(str(tmp_path / "run"), 5)
    assert metadata["alignment_token_ids"] == sorted({b + 3 for w in WORDS for b in w.encode()})


def test_alignment_without_transcripts_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="more than train.steps"):
        train(str(tmp_path / "a"), model=model_spec(llm="llama"), data=toy_source(), steps=2,
              phases=ALIGN_THEN_NEXT(3))
    with pytest.raises(ValueError, match="no transcript"):
        train(str(tmp_path / "b"), model=model_spec(llm="llama"), data=toy_source(with_text=False), steps=2,
              batch_size=8, phases=ALIGN_THEN_NEXT(1), eval_every=0)


def test_phases_must_cover_the_run_and_only_the_last_may_run_to_its_end():
    from slm_jax.training.loop import resolve_phases

    ctc, nt = CtcAlignment(), NextToken()
    assert resolve_phases([(3, ctc), (None, nt)], 5) == [(0, 3, ctc), (3, 5, nt)]
    assert resolve_phases([(0, ctc), (None, nt)], 5) == [(0, 5, nt)]  # a phase of 0 steps is left out
    assert resolve_phases([(2, ctc), (3, nt)], 5) == [(0, 2, ctc), (2, 5, nt)]
    for phases, message in [([], "empty"), ([(None, ctc), (None, nt)], "only the last"),
                            ([(2, ctc), (2, nt)], "cover 4 of train.steps"), ([(-1, nt)], "non-negative"),
                            ([(5, "next_token")], "must be \\(steps, objective\\)")]:
        with pytest.raises(UserError, match=message):
            resolve_phases(phases, 5)


def test_schedule_restarts_after_alignment():
    """``restarts`` start warm-up and cosine decay over (train.restart_schedule_each_phase):
    the next-token phase gets the peak rate again instead of the first phase's decayed one."""
    import optax

    plain = make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=300)[1]
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 300, 1e-4)
    assert all(float(plain(s)) == pytest.approx(float(reference(s))) for s in (0, 5, 10, 150, 299))
    restarted = make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=300, restarts=(200,))[1]
    first = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 200, 1e-4)
    assert float(restarted(150)) == pytest.approx(float(first(150)))
    assert float(restarted(199)) == pytest.approx(1e-4, rel=0.01)  # the first phase decayed
    assert float(restarted(200)) == 0.0 and float(restarted(210)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="restarts"):
        make_optimizer(total_steps=300, restarts=(300,))


@pytest.mark.slow
def test_train_restarts_the_schedule_at_each_phase_when_asked(tmp_path, monkeypatch):
    from slm_jax.training import loop as train_module

    restarts = []
    original = train_module.make_optimizer

    def spy(**kwargs):
        restarts.append(tuple(kwargs.get("restarts", ())))
        return original(**kwargs)

    monkeypatch.setattr(train_module, "make_optimizer", spy)
    # (without the flag no restart is passed: the other train() tests here run that way)
    train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=3, batch_size=8,
          phases=ALIGN_THEN_NEXT(2), eval_every=0, log_every=0, checkpoint_every=0, warmup_steps=1,
          restart_schedule_each_phase=True)
    assert restarts == [(2,)]


def test_a_front_end_that_writes_text_is_not_aligned(tmp_path):
    """Rows that spell the transcript meet CTC by copying it: the objective is refused before the
    run writes anything."""
    import dataclasses

    from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriberConfig

    spec = model_spec(llm="llama")
    transcriber = dataclasses.replace(spec, speech_encoder=WhisperTranscriberConfig(llm_vocabulary="any",
                                                                                    llm_token_rows=8))
    with pytest.raises(UserError, match="writes text"):
        CtcAlignment().for_run(toy_source(), transcriber)
