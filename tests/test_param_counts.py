"""Paper-scale configs: their shapes are the published models', counted with jax.eval_shape
(nothing is allocated)."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import pytest

from slm_jax.parallel import partitioning
from slm_jax.cli import common
from slm_jax.models.spec import sample_batch
from slm_jax.models.llms import llama, t5
from slm_jax.models.encoders import whisper as whisper_encoder
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer, count_params, tree_bytes

LENGTHS = {"audio_frames": 3000, "prefix": 16, "suffix": 16, "targets": 128}


def _spec(gin_file: str):
    gin.clear_config()
    common.parse_gin([gin_file], [])
    try:
        return gin.query_parameter("train.model").scoped_configurable_fn()
    finally:
        gin.clear_config()


def _counts(spec, optimizer: str = "adamw") -> dict[str, int]:
    optimizer, _ = make_optimizer(name=optimizer)
    trainer = Trainer(spec.build(), optimizer, None, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    example = sample_batch(2, LENGTHS)
    params = trainer.abstract_variables(example)["params"]
    counts = {k: count_params(v) for k, v in params.items()}
    state = trainer.abstract_state(example)
    counts["optimizer_state"] = count_params(state.opt_state)
    counts["optimizer_bytes"] = tree_bytes(state.opt_state)
    counts["param_bytes"] = tree_bytes(params)
    return counts


def _architecture(cfg):
    """Config fields without the run-time ones (dtypes, remat, attention implementation)."""
    runtime = {"dtype", "param_dtype", "remat_policy", "attention_implementation", "mask_padding"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in runtime}


@pytest.mark.slow
def test_paper_scale_usm_mt0xxl_parameter_counts():
    spec = _spec("paper_usm_mt0xxl.gin")
    c = _counts(spec)
    assert 1.9e9 < c["speech_encoder"] < 2.3e9  # USM: ~2B Conformer
    assert c["llm"] == spec.llm.num_params() == 12_921_057_280  # mT0-XXL
    assert c["adapter"] == pytest.approx(156e6, rel=0.03)  # the paper's 156M adapter
    total = c["speech_encoder"] + c["llm"] + c["adapter"]
    assert 0.008 < c["adapter"] / total < 0.012  # ~1% of all parameters
    # AdamW: two moments of the adapter only (nothing for the frozen 15B).
    assert c["optimizer_state"] == pytest.approx(2 * c["adapter"], abs=16)
    # Frozen weights in bfloat16, the adapter in float32.
    assert c["param_bytes"] == 2 * (total - c["adapter"]) + 4 * c["adapter"]
    # Adafactor (the paper config's optimizer, as in T5X): a few % of the (bfloat16) parameter bytes.
    c = _counts(spec, optimizer="adafactor")
    assert c["optimizer_bytes"] / c["param_bytes"] < 0.03


@pytest.mark.parametrize("gin_file,llm_preset", [
    ("paper_whisper_mt0xxl.gin", t5.mt0_xxl),
    ("paper_whisper_llama8b.gin", llama.llama3_8b),
])
def test_whisper_paper_configs_are_the_published_shapes(gin_file, llm_preset):
    spec = _spec(gin_file)
    assert _architecture(spec.speech_encoder) == _architecture(whisper_encoder.whisper_large())
    assert _architecture(spec.llm) == _architecture(llm_preset())
    assert spec.llm.param_dtype == spec.speech_encoder.param_dtype == jnp.bfloat16
    assert spec.adapter.d_model == 2560 and spec.adapter.num_layers == 2 and spec.adapter.subsample_rate == 4
    # The adapter alone, shapes only: the paper's ~156M, projecting into the LLM's width.
    adapter = spec.build().adapter
    hidden = jnp.zeros((1, 8, spec.speech_encoder.d_model))
    shapes = jax.eval_shape(lambda: adapter.init(jax.random.PRNGKey(0), hidden, jnp.ones((1, 8), jnp.int32)))
    assert count_params(shapes["params"]) == pytest.approx(156e6, rel=0.03)
    assert spec.llm.num_params() == (12_921_057_280 if llm_preset is t5.mt0_xxl else 8_030_261_248)
