"""The frozen-encoder cache: written once, reused only for the same encoder and every example,
and adopted from the corpus-wide directory older versions wrote it to."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from slm_jax.encoder_cache import adopt_cache, build_cache, reusable_cache
from slm_jax.models.slm import SLM

from tiny_models import model_spec


@pytest.fixture(scope="module")
def encoder():
    slm = model_spec(llm="llama").build()
    features = jnp.zeros((1, 64, 80))
    params = nn.unbox(slm.init(jax.random.PRNGKey(0), features, jnp.ones((1, 64), jnp.int32),
                               method=SLM.encode_speech))["params"]["speech_encoder"]
    return slm, params


def _examples():
    rng = np.random.default_rng(0)
    return [(f"utt{i}", rng.normal(size=(n, 80)).astype(np.float32)) for i, n in enumerate((40, 90, 64))]


def test_a_cache_is_reused_only_for_its_encoder_and_all_its_examples(encoder, tmp_path):
    slm, params = encoder
    cache = build_cache(str(tmp_path), slm, params, _examples(), "fp-a", batch_size=2, progress=False)
    assert len(cache) == 3 and cache["utt1"].shape[0] > cache["utt0"].shape[0]
    expected, _ = slm.apply({"params": {"speech_encoder": params}}, jnp.asarray(_examples()[1][1][None]),
                            jnp.ones((1, 90), jnp.int32), method=SLM.encode_speech)
    np.testing.assert_allclose(cache["utt1"], np.asarray(expected[0, :cache.frames("utt1")]), rtol=1e-5, atol=1e-5)
    assert reusable_cache(str(tmp_path), "fp-a", ["utt0", "utt2"]) is not None
    assert reusable_cache(str(tmp_path), "fp-b", ["utt0"]) is None  # another encoder
    assert reusable_cache(str(tmp_path), "fp-a", ["utt0", "utt9"]) is None  # an example it lacks
    with pytest.raises(KeyError, match="utt9"):
        cache["utt9"]


def test_an_older_corpus_wide_cache_moves_into_its_fingerprint_directory(encoder, tmp_path):
    slm, params = encoder
    old = tmp_path / "encoder_cache"
    written = build_cache(str(old), slm, params, _examples(), "fp-a", batch_size=2, progress=False)
    before = {i: written[i].copy() for i in ("utt0", "utt1", "utt2")}
    assert adopt_cache(str(old), str(old / "fp-b"), "fp-b", before) is None  # not this encoder's: left alone
    assert os.path.exists(old / "index.json")
    moved = adopt_cache(str(old), str(old / "fp-a"), "fp-a", before)
    assert not os.path.exists(old / "index.json") and os.path.exists(old / "fp-a" / "index.json")
    for key, value in before.items():
        np.testing.assert_array_equal(moved[key], value)
