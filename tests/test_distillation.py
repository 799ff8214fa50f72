"""The distillation objective: the LLM reading the transcript teaches the LLM reading the adapter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.errors import UserError
from slm_jax.models.front_end import SpeechRows, as_rows
from slm_jax.models.slm import SLM
from slm_jax.parallel import partitioning
from slm_jax.training.distillation import Distillation, teacher_and_student_logits
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer

from tiny_models import model_spec
from toy_cached_data import toy_source


def _setup(llm="llama", learning_rate=1e-2):
    """A tiny model's trainer, frozen weights, fresh train state, and a toy batch holding each
    transcript once (host arrays, every key)."""
    from slm_jax.models.spec import sample_batch

    data = toy_source()
    spec = model_spec(llm=llm)
    tx, schedule = make_optimizer(learning_rate=learning_rate, warmup_steps=1, total_steps=300)
    trainer = Trainer(spec.build(), tx, schedule, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: trainer.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    state = trainer.init_state(0, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    return trainer, frozen, state, data.batch(data.train_examples[:5])


def _jit_loss(objective, slm):
    return jax.jit(lambda params, rows, batch: objective.loss(slm, params, rows, batch))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_by_hand(teacher, student, mask, temperature=1.0):
    t, s = _log_softmax(np.asarray(teacher) / temperature), _log_softmax(np.asarray(student) / temperature)
    per_position = (np.exp(t) * (t - s)).sum(-1)
    mask = np.asarray(mask, np.float64)
    return temperature ** 2 * (per_position * mask).sum() / mask.sum(), mask.sum()


@pytest.mark.parametrize("llm", ["llama", "t5"])
@pytest.mark.slow
def test_loss_is_the_kl_between_the_llm_reading_the_transcript_and_reading_the_adapter(llm):
    from slm_jax.training.objectives import NextToken

    trainer, frozen, state, batch = _setup(llm)
    slm, params = trainer.model, {"adapter": state.adapter_params, "llm": frozen["llm"]}
    mask = batch["target_mask"]
    first = np.zeros_like(mask)
    first[:, 0] = 1
    cases = [(Distillation(), mask), (Distillation(positions=1), first),
             (Distillation(positions=3, temperature=2.0), mask * (np.arange(mask.shape[1]) < 3)),
             (Distillation(positions=1, next_token_weight=0.5), first)]
    # Each objective on its own inputs (positions=k cuts the decoder block on the host).
    inputs = [trainer.place_batch(batch, objective) for objective, _ in cases]

    @jax.jit  # one program for every case: a compilation each would cost more than the checks
    def run(params, batch, inputs):
        transcript = slm.apply({"params": params}, batch["transcript_tokens"], method=SLM.embed_tokens)
        # The two logits, each by the SLM's own forward (every target position of the batch).
        teacher = slm.apply({"params": params}, transcript, batch["transcript_mask"], batch,
                            method=SLM.logits_from_embeddings)
        student = slm.apply({"params": params}, as_rows(batch), batch, method=SLM.logits_from_speech)
        cut = [objective.loss(slm, params, as_rows(x), x) for (objective, _), x in zip(cases, inputs)]
        whole = [objective.loss(slm, params, as_rows(batch), batch)[0] for objective, _ in cases]
        return teacher, student, cut, whole, NextToken().loss(slm, params, as_rows(batch), batch)[0]

    teacher, student, cut, whole, next_token = jax.device_get(run(params, batch, inputs))
    assert np.abs(teacher - student).max() > 1e-3  # not the same prompt
    for (objective, positions), (loss, metrics), uncut in zip(cases, cut, whole):
        expected, count = _kl_by_hand(teacher, student, positions, objective.temperature)
        np.testing.assert_allclose(metrics["loss"], expected, rtol=2e-4, atol=1e-9)
        assert metrics["num_target_tokens"] == count
        # With a cross-entropy weight: KL + w * the next-token loss, which the metrics show apart.
        extra = objective.next_token_weight * next_token
        if objective.next_token_weight:
            np.testing.assert_allclose(metrics["next_token_loss"], next_token, rtol=1e-5)
        np.testing.assert_allclose(loss, expected + extra, rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(uncut, expected + extra, rtol=2e-4, atol=1e-9)  # the whole batch, uncut


@pytest.mark.slow
def test_only_the_adapter_learns_and_the_teacher_passes_no_gradient():
    trainer, frozen, state, batch = _setup("llama")
    objective = Distillation()
    placed = trainer.place_batch(batch, objective)
    assert {"transcript_tokens", "transcript_mask", "speech_hidden", "prefix_tokens", "decoder_input_tokens",
            "target_mask"} <= set(placed)
    assert "target_tokens" not in placed  # no answer labels are read without the cross-entropy term
    before_frozen = jax.tree.map(np.array, frozen)
    before_adapter = jax.tree.map(np.array, state.adapter_params)
    (_, _), grads = jax.jit(lambda a: trainer.loss_and_grads(a, frozen, placed, objective))(state.adapter_params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every adapter weight is reached
    for _ in range(3):
        state, metrics = trainer.train_step(state, frozen, placed, objective)
        assert bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, before_frozen, jax.tree.map(np.asarray, frozen))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before_adapter, state.adapter_params)
    assert all(jax.tree.leaves(changed))

    # The teacher is a constant: its logits have no gradient even with respect to the LLM's weights.
    rows = as_rows(placed)

    def teacher_sum(llm):
        params = {"adapter": state.adapter_params, "llm": llm}
        teacher, _ = trainer.model.apply({"params": params}, rows, placed, method=teacher_and_student_logits)
        return jnp.sum(teacher)

    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(jax.jit(jax.grad(teacher_sum))(frozen["llm"])))


@pytest.mark.parametrize("llm, objective", [("llama", Distillation()), ("t5", Distillation(positions=1))])
@pytest.mark.slow
def test_training_lowers_the_kl_and_learns_which_words_were_said(llm, objective):
    trainer, frozen, state, batch = _setup(llm)
    placed = trainer.place_batch(batch, objective)
    losses = []
    for _ in range(200):
        state, metrics = trainer.train_step(state, frozen, placed, objective)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::20]
    # Not only the LLM's distribution in general: each example's speech matches its own transcript
    # far better than another example's.
    params = {"adapter": state.adapter_params, "llm": frozen["llm"]}
    rows = as_rows(placed)
    loss = _jit_loss(objective, trainer.model)
    matched = float(loss(params, rows, placed)[0])
    other = {**placed, **{k: jnp.roll(placed[k], 1, axis=0) for k in ("transcript_tokens", "transcript_mask")}}
    mismatched = float(loss(params, rows, other)[0])
    assert mismatched > 10 * matched, (matched, mismatched)


class _TranscriptAdapterSLM(SLM):
    """An SLM whose 'adapter' hands the LLM its rows unchanged: rows that are the transcript's token
    embeddings make the student read exactly what the teacher reads."""

    def adapt(self, rows):
        return rows.hidden, rows.mask


@pytest.mark.parametrize("llm", ["llama", "t5"])
@pytest.mark.slow
def test_an_adapter_that_outputs_the_transcript_embeddings_has_no_loss(llm):
    trainer, frozen, state, batch = _setup(llm)
    slm = trainer.model
    echo = _TranscriptAdapterSLM(slm.speech_encoder.clone(), slm.adapter.clone(), slm.llm.clone())
    params = {"adapter": state.adapter_params, "llm": frozen["llm"]}
    objective = Distillation()
    placed = trainer.place_batch(batch, objective)
    embeddings = slm.apply({"params": params}, placed["transcript_tokens"], method=SLM.embed_tokens)
    rows = SpeechRows(embeddings, placed["transcript_mask"])
    loss, metrics = _jit_loss(objective, echo)(params, rows, placed)
    assert abs(float(loss)) < 1e-6 and float(metrics["num_target_tokens"]) > 0
    # The same embeddings of another example's transcript: the teacher tells them apart.
    shuffled = SpeechRows(jnp.roll(embeddings, 1, axis=0), jnp.roll(placed["transcript_mask"], 1, axis=0))
    mismatched = float(_jit_loss(objective, echo)(params, shuffled, placed)[0])
    assert mismatched > 1e-3, mismatched


def test_refusals():
    data, spec = toy_source(), model_spec(llm="llama")
    assert Distillation().for_run(data, spec) == Distillation()
    with pytest.raises(UserError, match="needs the transcript of every training example"):
        Distillation().for_run(toy_source(with_text=False), spec)
    from slm_jax.data.synthetic import SyntheticData

    with pytest.raises(UserError, match="needs transcripts; the data source SyntheticData has none"):
        Distillation().for_run(SyntheticData(data.feature_lengths, vocab_size=128), spec)
    from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriberConfig

    transcriber = dataclasses.replace(spec, speech_encoder=WhisperTranscriberConfig(llm_vocabulary="any",
                                                                                    llm_token_rows=8))
    with pytest.raises(UserError, match="writes text"):
        Distillation().for_run(data, transcriber)
    # Rows that spell tokens reaching the loss anyway (e.g. without for_run) are refused too.
    rows = SpeechRows(jnp.zeros((1, 4, 32)), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="writes text"):
        teacher_and_student_logits(None, rows, {})
    batch = toy_source(with_text=False).batch(toy_source(with_text=False).train_examples[:2])
    with pytest.raises(ValueError, match="transcript_tokens, transcript_mask missing"):
        Distillation().inputs(batch)
    for bad, message in [(dict(positions=0), "positions"), (dict(positions=1.5), "positions"),
                         (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                         (dict(next_token_weight=-1.0), "next_token_weight")]:
        with pytest.raises(ValueError, match=message):
            Distillation(**bad)


@pytest.mark.slow
def test_gin_selects_distillation_for_a_run(tmp_path):
    import gin

    from slm_jax import gin_registry  # noqa: F401
    from slm_jax.training.loop import train

    gin.parse_config(["train.phases = [(None, @Distillation())]", "Distillation.positions = 1"])
    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=2, batch_size=8,
                   eval_every=0, log_every=1, checkpoint_every=0, learning_rate=1e-3, warmup_steps=1)
    assert result["step"] == 2 and np.isfinite(result["loss"]) and result["num_target_tokens"] == 8.0
