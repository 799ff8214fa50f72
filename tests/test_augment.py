"""Masking of the encoder output in training (slm_jax/training/augment.py) and its place in the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.training.augment import SpeechMasking, mask_speech
from slm_jax.models.spec import sample_batch
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.objectives import NextToken
from slm_jax.training.step import Trainer
from slm_jax.parallel import partitioning

from tiny_models import model_spec
from toy_cached_data import toy_source


def _hidden(b=3, t=60, d=32, lengths=(60, 40, 17)):
    hidden = jax.random.normal(jax.random.key(1), (b, t, d)) + 3.0  # no exact zeros by chance
    mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    return hidden * mask[..., None], mask


@pytest.mark.slow
def test_masks_are_bounded_inside_each_utterance_and_deterministic():
    hidden, mask = _hidden()
    config = SpeechMasking(time_masks=2, max_time_frames=10, max_time_fraction=0.2, feature_masks=1, max_features=5)
    seen_time_masking = False
    for seed in range(20):
        out = np.asarray(mask_speech(jax.random.key(seed), hidden, mask, config))
        np.testing.assert_array_equal(out, np.asarray(mask_speech(jax.random.key(seed), hidden, mask, config)))
        zero = out == 0
        for row, length in enumerate((60, 40, 17)):
            real = zero[row, :length]
            zero_channels = real.all(axis=0)  # channel bands zero at every real frame
            assert zero_channels.sum() <= 5
            frames = real[:, ~zero_channels].all(axis=1)  # time spans: every other channel zero too
            span_budget = 2 * min(10, int(0.2 * length))
            assert frames.sum() <= span_budget, (seed, row, frames.sum())
            seen_time_masking |= bool(frames.any())
            # Untouched values are exactly the input.
            keep = ~zero[row]
            np.testing.assert_array_equal(out[row][keep], np.asarray(hidden)[row][keep])
    assert seen_time_masking
    other = np.asarray(mask_speech(jax.random.key(99), hidden, mask, config))
    assert not np.array_equal(other, np.asarray(mask_speech(jax.random.key(0), hidden, mask, config)))


def test_no_masks_is_the_identity():
    hidden, mask = _hidden()
    out = mask_speech(jax.random.key(0), hidden, mask, SpeechMasking(time_masks=0, feature_masks=0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(hidden))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="time_masks"):
        SpeechMasking(time_masks=-1)
    with pytest.raises(ValueError, match="max_time_fraction"):
        SpeechMasking(max_time_fraction=1.5)


def _trainer(data, masking):
    spec = model_spec(llm="llama")
    tx, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    return Trainer(spec.build(), tx, schedule, mesh, speech_masking=masking, masking_seed=0)


@pytest.mark.slow
def test_train_step_masks_from_the_step_number_only():
    data = toy_source()
    example = sample_batch(4, data.feature_lengths)
    losses = {}
    for name, masking in (("plain", None), ("masked", SpeechMasking(time_masks=2, max_time_frames=8, feature_masks=2,
                                                                    max_features=8))):
        trainer = _trainer(data, masking)
        frozen = {n: trainer.init_frozen_randomly(n, i, example) for i, n in enumerate(("speech_encoder", "llm"))}
        trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
        batch = trainer.place_batch(data.batch(data.train_examples[:4]), NextToken())
        runs = []
        for _ in range(2):  # the same state and batch twice: the same masks, the same loss
            state = trainer.init_state(0, example)
            state, metrics = trainer.train_step(state, frozen, batch)
            state, metrics2 = trainer.train_step(state, frozen, batch)
            runs.append((float(metrics["loss"]), float(metrics2["loss"])))
        assert runs[0] == runs[1]
        losses[name] = runs[0]
    # Step 1 of the unmasked and masked runs start from equal parameters: only the mask differs.
    assert losses["plain"][0] != losses["masked"][0]
