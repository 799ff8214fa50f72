"""Frozen means frozen: only the adapter learns, holds optimizer state, and gets gradients."""

import jax
import numpy as np
import pytest

from slm_jax.parallel import partitioning
from slm_jax.weights.frozen import load_frozen_params
from slm_jax.data.synthetic import SyntheticData
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer, count_params, tree_bytes
from tiny_models import FEATURE_LENGTHS, VOCAB, model_spec


_SETUPS = {}


def _setup(llm="t5", encoder="whisper"):
    """One compiled trainer per model, shared by the tests of this file (compiles are slow)."""
    if (llm, encoder) not in _SETUPS:
        _SETUPS[llm, encoder] = _build(llm, encoder)
    trainer, data, frozen, state = _SETUPS[llm, encoder]
    return trainer, data, frozen, jax.tree.map(lambda x: x.copy(), state)  # steps donate the state


def _build(llm, encoder):
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    spec = model_spec(llm, encoder)
    optimizer, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=40)
    trainer = Trainer(spec.build(), optimizer, schedule, mesh)
    data = SyntheticData(FEATURE_LENGTHS, VOCAB, seed=1)
    example = data.batch(4, 0)
    frozen = load_frozen_params(trainer, spec, example)
    state = trainer.init_state(0, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    return trainer, data, frozen, state


@pytest.mark.parametrize("llm", ["t5", "llama"])
@pytest.mark.slow
def test_frozen_weights_bitwise_unchanged_and_adapter_learns(llm):
    trainer, data, frozen, state = _setup(llm)
    frozen_before = jax.device_get(frozen)
    adapter_before = jax.device_get(state.adapter_params)
    losses = []
    for i in range(12):
        state, metrics = trainer.train_step(state, frozen, trainer.place_batch(data.batch(4, 0)))
        losses.append(float(metrics["loss"]))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(frozen))):
        assert np.array_equal(before, after)
    changed = [not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(adapter_before), jax.tree.leaves(jax.device_get(state.adapter_params)))]
    assert all(changed), "every adapter parameter should move"
    # A random frozen LLM is hard to steer, so the fall is small, but it is steady and deterministic.
    assert losses[-1] < losses[0] - 0.1, losses


def test_optimizer_state_is_sized_by_the_adapter_alone():
    trainer, _, frozen, state = _setup()
    adapter_bytes = tree_bytes(state.adapter_params)
    opt_bytes = tree_bytes(state.opt_state)
    # AdamW: two moment buffers per adapter parameter, plus a few scalar counters.
    assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 64
    assert count_params(frozen) > count_params(state.adapter_params)
    # Nothing of the frozen trees appears in the optimizer state.
    adapter_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state.adapter_params))
    moment_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moment_shapes == sorted(adapter_shapes * 2)


def _count_primitive(jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
            n += _count_primitive(sub, name)
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                n += _count_primitive(inner, name)
            elif hasattr(v, "eqns"):
                n += _count_primitive(v, name)
    return n


def test_no_gradient_is_computed_for_the_speech_encoder():
    """The encoder's convolutions appear once (forward) in the gradient computation.

    Differentiating through the Whisper stem would add transposed convolutions; the control
    below shows that this count does change when gradients do reach the encoder.
    """
    trainer, data, frozen, state = _setup("t5", "whisper")
    batch = trainer.place_batch(data.batch(4, 0))
    jaxpr = jax.make_jaxpr(trainer.loss_and_grads)(state.adapter_params, frozen, batch).jaxpr
    forward_convs = 2  # Whisper's conv1 and conv2
    assert _count_primitive(jaxpr, "conv_general_dilated") == forward_convs

    # Control: a gradient that does flow through the encoder adds backward convolutions, so the
    # count above would catch one.
    from slm_jax.models.slm import SLM

    def encoder_output_sum(encoder_params):
        rows = trainer.model.apply({"params": {"speech_encoder": encoder_params}}, batch["audio_features"],
                                   batch["audio_mask"], method=SLM.encode_speech)
        return rows.hidden.sum()

    control = jax.make_jaxpr(jax.grad(encoder_output_sum))(frozen["speech_encoder"]).jaxpr
    assert _count_primitive(control, "conv_general_dilated") > forward_convs


def test_adapter_is_a_small_fraction_of_the_model():
    _, _, frozen, state = _setup()
    assert count_params(state.adapter_params) > 0
    assert set(frozen) == {"speech_encoder", "llm"}
