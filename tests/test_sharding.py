"""The same loss and adapter gradients on 1 device and on 8 devices in several mesh shapes."""

import jax
import numpy as np
import pytest

from slm_jax.parallel import partitioning
from slm_jax.weights.frozen import load_frozen_params
from slm_jax.data.synthetic import SyntheticData
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer
from tiny_models import FEATURE_LENGTHS, VOCAB, model_spec

MESHES = [(1, 1), (8, 1), (2, 4), (1, 8)]  # (data, model)


def _run(llm: str, data: int, model: int):
    mesh = partitioning.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])
    spec = model_spec(llm)
    optimizer, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10)
    trainer = Trainer(spec.build(), optimizer, schedule, mesh)
    synthetic = SyntheticData(FEATURE_LENGTHS, VOCAB, seed=3)
    example = synthetic.batch(8, 0)
    frozen = load_frozen_params(trainer, spec, example)
    state = trainer.init_state(0, example)
    trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
    batch = trainer.place_batch(example)
    # The train step applies exactly these gradients (Trainer.loss_and_grads).
    (loss, _), grads = jax.jit(trainer.loss_and_grads)(state.adapter_params, frozen, batch)
    return {
        "loss": float(loss),
        "grads": jax.device_get(grads),
        "frozen_specs": jax.tree.map(lambda x: x.sharding.spec, frozen),
        "grad_specs": jax.tree.map(lambda x: x.sharding.spec, grads),
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("llm,meshes", [("t5", MESHES[1:]), ("llama", [(2, 4)])])
@pytest.mark.slow
def test_mesh_shapes_agree_with_one_device(llm, meshes):
    assert len(jax.devices()) >= 8, "conftest.py must give 8 host CPU devices"
    reference = _run(llm, 1, 1)
    assert np.isfinite(reference["loss"])
    for data, model in meshes:
        got = _run(llm, data, model)
        assert abs(got["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"]), (data, model)
        for g, r in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(reference["grads"])):
            assert _rel(g, r) < 1e-4, (data, model)
        if model > 1:
            # The test is only meaningful if the model axis really splits the frozen LLM.
            specs = [s for s in jax.tree.leaves(got["frozen_specs"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))]
            assert any("model" in str(s) for s in specs)


def test_logical_rules_degrade_to_replication_when_not_divisible():
    mesh = partitioning.make_mesh(data=2, model=4, devices=jax.devices()[:8])
    # 3 key/value heads cannot be split 4 ways: replicated rather than a compile error.
    spec = partitioning.logical_to_mesh_spec(("embed", "kv_heads", "kv"), (64, 3, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, None)
    spec = partitioning.logical_to_mesh_spec(("embed", "heads", "kv"), (64, 8, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "model", None)
    spec = partitioning.logical_to_mesh_spec(("batch", "length"), (8, 5), mesh)
    assert spec == jax.sharding.PartitionSpec("data", None)
