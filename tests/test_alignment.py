"""The CTC alignment objective: sub-vocabulary, feasibility, the step, and its place in train()."""

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
from slm_jax.training.step import Trainer, make_optimizer

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


def _trainer(data, llm="llama", alignment_weight=0.0):
    spec = model_spec(llm=llm)
    tx, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=300)
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    vocab = alignment.AlignmentVocabulary(data.alignment_token_ids(), spec.llm.vocab_size)
    trainer = Trainer(spec.build(), tx, schedule, mesh, alignment_vocabulary=vocab, alignment_weight=alignment_weight)
    return trainer, spec


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_alignment_steps_learn_the_transcript_and_leave_frozen_weights_alone(llm):
    from slm_jax.models.spec import sample_batch

    data = toy_source()
    trainer, spec = _trainer(data, llm)
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: trainer.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    before = jax.tree.map(np.asarray, frozen)
    state = trainer.init_state(0, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    batch = data.batch(data.train_examples[:5])  # one example of each transcript
    placed = trainer.place_batch(batch, "alignment")
    assert set(placed) == {"speech_hidden", "speech_mask", "transcript_tokens", "transcript_mask"}
    losses = []
    for _ in range(300):
        state, metrics = trainer.train_step(state, frozen, placed, "alignment")
        losses.append(float(metrics["loss"]))
        assert float(metrics["num_target_tokens"]) == sum(len(w) for w in WORDS)  # every row fits
    assert losses[-1] < 0.1 * losses[0], losses[::50]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen))
    # What the adapter now 'says' is the transcript.
    logits, frame_mask = trainer.model.apply(
        {"params": {"adapter": state.adapter_params, "llm": frozen["llm"]}}, placed["speech_hidden"],
        placed["speech_mask"], jnp.asarray(trainer.alignment_vocabulary.ids), method=type(trainer.model).alignment_logits)
    decoded = alignment.greedy_decode(np.asarray(logits), np.asarray(frame_mask), trainer.alignment_vocabulary)
    assert [data.vocabulary.decode(d) for d in decoded] == WORDS


def test_next_token_batches_carry_no_transcripts():
    data = toy_source()
    trainer, _ = _trainer(data)
    batch = data.batch(data.train_examples[:4])
    assert "transcript_tokens" in batch
    assert not {"transcript_tokens", "transcript_mask"} & set(trainer.place_batch(batch, "next_token"))


def test_joint_next_token_step_adds_the_weighted_ctc_loss():
    """alignment_weight w: a next-token step's loss and gradients are the next-token ones plus w
    times the alignment step's, on the same batch and parameters."""
    from slm_jax.models.spec import sample_batch

    data = toy_source()
    joint, _ = _trainer(data, alignment_weight=0.5)
    plain, _ = _trainer(data)
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: joint.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    params = joint.init_state(0, example).adapter_params
    batch = data.batch(data.train_examples[:4])
    joint_batch = joint.place_batch(batch, "next_token")
    assert {"transcript_tokens", "transcript_mask", "target_tokens"} <= set(joint_batch)
    (loss, aux), grads = joint.loss_and_grads(params, frozen, joint_batch, "next_token")
    (nt_loss, _), nt_grads = plain.loss_and_grads(params, frozen, plain.place_batch(batch, "next_token"), "next_token")
    (ctc_loss, _), ctc_grads = plain.loss_and_grads(params, frozen, plain.place_batch(batch, "alignment"), "alignment")
    assert float(ctc_loss) > 0.1
    np.testing.assert_allclose(float(loss), float(nt_loss) + 0.5 * float(ctc_loss), rtol=1e-5)
    np.testing.assert_allclose(float(aux[2]), float(ctc_loss), rtol=1e-5)
    jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, a + 0.5 * b, rtol=1e-4, atol=1e-6),
                 grads, nt_grads, ctc_grads)


def test_train_with_alignment_weight_logs_both_losses(tmp_path):
    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=3, batch_size=8,
                   alignment_steps=1, alignment_weight=0.3, eval_every=0, log_every=1, checkpoint_every=0,
                   learning_rate=1e-3, warmup_steps=1)
    assert result["step"] == 3 and np.isfinite(result["loss"]) and result["alignment_loss"] > 0
    with pytest.raises(UserError, match="alignment_weight must be >= 0"):
        train(str(tmp_path / "bad"), model=model_spec(llm="llama"), data=toy_source(), steps=2, alignment_weight=-1.0)
    assert not (tmp_path / "bad").exists()


def test_train_runs_the_alignment_steps_first_then_the_next_token_loss(tmp_path, monkeypatch):
    objectives = []
    original = Trainer.train_step

    def spy(self, state, frozen, batch, objective="next_token"):
        objectives.append(objective)
        return original(self, state, frozen, batch, objective)

    monkeypatch.setattr(Trainer, "train_step", spy)
    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=5, batch_size=8,
                   alignment_steps=3, eval_every=0, log_every=1, checkpoint_every=0, learning_rate=1e-3,
                   warmup_steps=1)
    assert objectives == ["alignment"] * 3 + ["next_token"] * 2
    assert result["step"] == 5 and np.isfinite(result["loss"])
    # The checkpoint records the sub-vocabulary, so its CTC head can be read without the corpus.
    from slm_jax.training import checkpointing

    metadata = checkpointing.read_metadata(str(tmp_path / "run"), 5)
    assert metadata["alignment_token_ids"] == sorted({b + 3 for w in WORDS for b in w.encode()})
    assert metadata["alignment_centered"] is False


def test_alignment_without_transcripts_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="more than train.steps"):
        train(str(tmp_path / "a"), model=model_spec(llm="llama"), data=toy_source(), steps=2, alignment_steps=3)
    with pytest.raises(ValueError, match="no transcript"):
        train(str(tmp_path / "b"), model=model_spec(llm="llama"), data=toy_source(with_text=False), steps=2,
              batch_size=8, alignment_steps=1, eval_every=0)


def test_centred_scores_ignore_a_direction_common_to_all_embeddings():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(12, 6)).astype(np.float32)
    speech = rng.normal(size=(2, 5, 6)).astype(np.float32)
    common = 4.0 * rng.normal(size=6).astype(np.float32)
    centred = np.asarray(alignment.alignment_logits(jnp.asarray(speech), jnp.asarray(table), centered=True))
    mean = table.mean(0)
    np.testing.assert_allclose(centred[..., 1:], np.einsum("btd,vd->btv", speech - mean, table - mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(centred[..., 0], 0.0)  # the blank stays the zero score
    # Shifting every embedding and the speech by one vector changes plain scores, not centred ones.
    shifted = np.asarray(alignment.alignment_logits(jnp.asarray(speech + common), jnp.asarray(table + common), centered=True))
    np.testing.assert_allclose(shifted, centred, rtol=1e-4, atol=1e-4)
    plain = np.asarray(alignment.alignment_logits(jnp.asarray(speech + common), jnp.asarray(table + common)))
    assert np.abs(plain - np.asarray(alignment.alignment_logits(jnp.asarray(speech), jnp.asarray(table)))).max() > 1.0


def test_schedule_restarts_after_alignment():
    """``restarts`` start warm-up and cosine decay over (train.restart_schedule_after_alignment):
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


def test_train_restarts_the_schedule_after_alignment_when_asked(tmp_path, monkeypatch):
    from slm_jax.training import loop as train_module

    restarts = []
    original = train_module.make_optimizer

    def spy(**kwargs):
        restarts.append(tuple(kwargs.get("restarts", ())))
        return original(**kwargs)

    monkeypatch.setattr(train_module, "make_optimizer", spy)
    # (without the flag no restart is passed: the other train() tests here run that way)
    train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=3, batch_size=8,
          alignment_steps=2, eval_every=0, log_every=0, checkpoint_every=0, warmup_steps=1,
          restart_schedule_after_alignment=True)
    assert restarts == [(2,)]


def test_ctc_compress_keeps_one_mean_embedding_per_run_of_a_token():
    # Best classes per frame: blank, a, a, blank, a, b, b, c (padding: never kept, though not blank).
    best = np.array([[0, 1, 1, 0, 1, 2, 2, 3]])
    logits = jnp.asarray(np.eye(4)[best] * 5.0)
    embeds = jnp.arange(8, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 1, 2))
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]])
    compressed, out_mask = alignment.ctc_compress(embeds, mask, logits)
    np.testing.assert_array_equal(np.asarray(out_mask), [[1, 1, 1, 0, 0, 0, 0, 0]])
    # Runs: a (frames 1-2), a again after a blank (frame 4), b (frames 5-6).
    np.testing.assert_allclose(np.asarray(compressed[0, :3, 0]), [1.5, 4.0, 5.5])
    np.testing.assert_array_equal(np.asarray(compressed[0, 3:]), 0.0)
    # Gradients reach exactly the kept frames, each in proportion to its share of its run.
    grad = jax.grad(lambda e: jnp.sum(alignment.ctc_compress(e, mask, logits)[0][..., 0]))(embeds)
    np.testing.assert_allclose(np.asarray(grad[0, :, 0]), [0, 0.5, 0.5, 0, 1, 0.5, 0.5, 0])


def test_expected_token_embeddings_mix_the_tokens_by_their_posterior_without_the_blank():
    table = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]))  # blank, token 0, token 1
    mixed = alignment.expected_token_embeddings(logits, table)
    np.testing.assert_allclose(np.asarray(mixed), [[[0.5, 1.0], [0.25, 1.5]]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["outputs", "tokens"])
def test_compressed_prompt_is_the_llm_reading_only_the_kept_runs(mode):
    """With ctc_compression the next-token logits are those of a prompt whose speech block holds
    only the CTC runs (the padding after them is invisible to the LLM)."""
    from slm_jax.models.spec import sample_batch
    from slm_jax.models.slm import SLM

    data = toy_source()
    trainer, _ = _trainer(data)
    trainer.ctc_compression = mode
    example = sample_batch(4, data.feature_lengths)
    frozen = {name: trainer.init_frozen_randomly(name, i, example) for i, name in enumerate(("speech_encoder", "llm"))}
    params = {"adapter": trainer.init_state(0, example).adapter_params, "llm": frozen["llm"]}
    batch = trainer.place_batch(data.batch(data.train_examples[:1]), "next_token")
    ids = jnp.asarray(trainer.alignment_vocabulary.ids)
    hidden, mask = batch["speech_hidden"], batch["speech_mask"]
    compressed = trainer.model.apply({"params": params}, hidden, mask, batch, ids, False, mode,
                                     method=SLM.logits_from_speech)
    plain = trainer.model.apply({"params": params}, hidden, mask, batch, method=SLM.logits_from_speech)

    speech, speech_mask = trainer.model.apply({"params": params}, hidden, mask, ids, False, mode, method=SLM.adapt)
    runs = int(np.sum(np.asarray(speech_mask)))
    assert 0 < runs < int(np.sum(np.asarray(mask)))  # a random adapter still calls some frames blank
    if mode == "tokens":  # each run is a convex mixture of the sub-vocabulary's embeddings
        table = trainer.model.apply({"params": params}, ids[None], method=lambda m, x: m.llm.embed(x))[0]
        assert np.linalg.norm(np.asarray(speech[0, :runs]), axis=-1).max() <= np.linalg.norm(table, axis=-1).max()

    def reference(m):
        embeds, prompt_mask = m.prompt_embeddings(speech[:, :runs], speech_mask[:, :runs], batch)
        decoder = m.llm.embed(batch["decoder_input_tokens"])
        full = jnp.concatenate([embeds, decoder], axis=1)
        full_mask = jnp.concatenate([prompt_mask, batch["target_mask"].astype(prompt_mask.dtype)], axis=1)
        from slm_jax.layers.embeddings import positions_from_mask

        out, _ = m.llm(full, full_mask, positions_from_mask(full_mask))
        return m.llm.logits(out[:, -decoder.shape[1]:])

    expected = trainer.model.apply({"params": params}, method=reference)
    np.testing.assert_allclose(np.asarray(compressed), np.asarray(expected), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(compressed), np.asarray(plain), atol=1e-3)
    # The trainer's next-token loss is the compressed one.
    (loss, _), _ = trainer.loss_and_grads(params["adapter"], frozen, batch, "next_token")
    from slm_jax.models.slm import masked_cross_entropy

    loss_sum, tokens = masked_cross_entropy(compressed, batch["target_tokens"], batch["target_mask"])
    np.testing.assert_allclose(float(loss), float(loss_sum / tokens), rtol=1e-5)


def test_train_with_ctc_compression_records_it_in_the_checkpoint(tmp_path):
    from slm_jax.training import checkpointing

    result = train(str(tmp_path / "run"), model=model_spec(llm="llama"), data=toy_source(), steps=3, batch_size=8,
                   alignment_steps=1, ctc_compression="tokens", eval_every=0, log_every=1, checkpoint_every=0,
                   learning_rate=1e-3, warmup_steps=1)
    assert result["step"] == 3 and np.isfinite(result["loss"])
    assert checkpointing.read_metadata(str(tmp_path / "run"), 3)["ctc_compression"] == "tokens"
    with pytest.raises(UserError, match="ctc_compression must be"):
        train(str(tmp_path / "c"), model=model_spec(llm="llama"), data=toy_source(), steps=2, ctc_compression="all")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="no transcript"):
        train(str(tmp_path / "b"), model=model_spec(llm="llama"), data=toy_source(with_text=False), steps=2,
              batch_size=8, ctc_compression="outputs", eval_every=0)


def test_one_rule_names_a_bad_compression_mode():
    from slm_jax.training.alignment import compression_problem

    assert compression_problem("", "train.ctc_compression") is None
    assert compression_problem("tokens", "compression", off_allowed=False) is None
    assert compression_problem("all", "train.ctc_compression") == (
        "train.ctc_compression must be '' (off) or one of ('outputs', 'tokens'), got 'all'")
    assert compression_problem("", "compression", off_allowed=False) == (
        "compression must be one of ('outputs', 'tokens'), got ''")


class _TranscriberRowsConfig:
    """What SLM reads of a transcriber front end's config (slm_jax/contrib/whisper_cascade/front_end.py)."""

    def __init__(self, encoder_rows_every):
        self.llm_token_channels = 1
        self.encoder_rows_every = encoder_rows_every


class _GivenRows(nn.Module):
    """A front end whose rows the test writes itself; the SLM reads only its config."""
    config: _TranscriberRowsConfig


def test_a_transcriber_is_aligned_on_its_encoder_rows_alone():
    """The rows of Whisper's transcript (LLM id > 0) spell the answer: the alignment masks them out
    of the adapter's input, so the encoder rows' CTC logits cannot depend on them."""
    slm = model_spec(llm="llama", subsample_rate=1).build().clone(
        speech_encoder=_GivenRows(_TranscriberRowsConfig(4)))
    rng = np.random.default_rng(0)
    states = rng.normal(size=(1, 6, 32)).astype(np.float32)
    states[:, 4:] = 0.0  # token rows carry no state (decoder_states=False)
    rows = np.concatenate([states, np.array([[0, 0, 0, 0, 6, 10]], np.float32)[..., None]], axis=-1)
    other = rows.copy()
    other[0, 4:, -1] = [21, 3]  # the transcript says other tokens
    mask = np.ones((1, 6), np.int32)
    token_ids = jnp.arange(1, 40)
    params = slm.init(jax.random.key(0), rows, mask, token_ids, method=SLM.alignment_logits)
    logits, frame_mask = slm.apply(params, rows, mask, token_ids, method=SLM.alignment_logits)
    assert np.asarray(frame_mask).tolist() == [[1, 1, 1, 1, 0, 0]]
    other_logits, _ = slm.apply(params, other, mask, token_ids, method=SLM.alignment_logits)
    np.testing.assert_array_equal(np.asarray(logits)[:, :4], np.asarray(other_logits)[:, :4])
    # Without the mask the encoder rows do attend to the transcript: the masking is what holds.
    embeds, _ = slm.apply(params, rows, mask, method=SLM.adapt)
    other_embeds, _ = slm.apply(params, other, mask, method=SLM.adapt)
    assert np.abs(np.asarray(embeds)[:, :4] - np.asarray(other_embeds)[:, :4]).max() > 1e-4
    # An utterance the gate gave no encoder rows (encoder_rows_below_confidence): no frame, finite
    # logits, and its CTC term is left out as infeasible rather than poisoning the batch.
    tokens_only = rows.copy()
    tokens_only[0, :4] = 0.0
    tokens_only[0, :4, -1] = [2, 3, 4, 5]
    both = np.concatenate([rows, tokens_only])
    both_logits, both_mask = slm.apply(params, both, np.ones((2, 6), np.int32), token_ids,
                                       method=SLM.alignment_logits)
    assert np.asarray(both_mask).tolist() == [[1, 1, 1, 1, 0, 0], [0] * 6]
    assert np.isfinite(np.asarray(both_logits)).all()
    labels, label_mask = jnp.array([[3, 7], [3, 7]]), jnp.ones((2, 2), jnp.int32)
    loss_sum, num_tokens = alignment.ctc_alignment_loss(both_logits, both_mask, labels, label_mask)
    alone, _ = alignment.ctc_alignment_loss(logits, frame_mask, labels[:1], label_mask[:1])
    assert float(num_tokens) == 2.0 and float(loss_sum) == pytest.approx(float(alone), rel=1e-5)
    # A transcriber without encoder rows has nothing to align.
    no_sound = slm.clone(speech_encoder=_GivenRows(_TranscriberRowsConfig(0)))
    with pytest.raises(ValueError, match="encoder_rows_every"):
        no_sound.apply(params, rows, mask, token_ids, method=SLM.alignment_logits)
    # CTC compression would run the CTC head over the token rows too, unmasked: refused.
    with pytest.raises(ValueError, match="CTC compression .* transcriber"):
        slm.apply(params, rows, mask, token_ids, method=SLM.adapt)


def test_train_refuses_to_align_a_transcriber_without_encoder_rows_before_writing(tmp_path):
    import dataclasses

    data = toy_source()
    no_sound, with_sound = (dataclasses.replace(model_spec(llm="llama"), speech_encoder=_TranscriberRowsConfig(n))
                            for n in (0, 4))
    refused = [(no_sound, {"alignment_steps": 1}, "encoder_rows_every"),
               (no_sound, {"alignment_weight": 0.5}, "encoder_rows_every"),
               # CTC compression of a transcriber is refused with or without encoder rows.
               (no_sound, {"ctc_compression": "outputs"}, "CTC compression"),
               (with_sound, {"ctc_compression": "tokens"}, "CTC compression")]
    for spec, setting, message in refused:
        with pytest.raises(UserError, match=message):
            train(str(tmp_path / "run"), model=spec, data=data, steps=2, **setting)
        assert not (tmp_path / "run").exists()
