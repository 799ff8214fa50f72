"""The frozen-encoder cache: written once, reused only for the same encoder and every example,
adopted from the corpus-wide directory older versions wrote it to, and extended in place by
evaluation's FrontEndMemo."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from slm_jax.data.cached.encoder_cache import FrontEndMemo, adopt_cache, build_cache, extend_cache, reusable_cache, write_cache
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


@pytest.mark.slow
def test_a_cache_is_reused_only_for_its_encoder_and_all_its_examples(encoder, tmp_path):
    slm, params = encoder
    cache = build_cache(str(tmp_path), slm, params, _examples(), "fp-a", batch_size=2, progress=False)
    assert len(cache) == 3 and cache["utt1"].shape[0] > cache["utt0"].shape[0]
    expected = slm.apply({"params": {"speech_encoder": params}}, jnp.asarray(_examples()[1][1][None]),
                         jnp.ones((1, 90), jnp.int32), method=SLM.encode_speech).hidden
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


def test_extending_a_cache_keeps_its_rows_adds_the_new_and_leaves_no_old_shard(tmp_path):
    rows = {i: np.full((n, 3), k, np.float32) for k, (i, n) in enumerate((("a", 2), ("b", 5)))}
    write_cache(str(tmp_path), "fp", rows.items())
    old_shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".npy"))
    cache = extend_cache(str(tmp_path), "fp", {"c": np.ones((4, 3), np.float32), "a": np.zeros((1, 3), np.float32)})
    assert sorted(cache.ids()) == ["a", "b", "c"]
    np.testing.assert_array_equal(cache["b"], rows["b"])  # kept
    assert cache["a"].shape == (1, 3) and cache["c"].shape == (4, 3)  # replaced, added
    assert not set(old_shards) & set(os.listdir(tmp_path))  # the replaced write's shards are gone
    # A cache of another front end is never reused: extending replaces it.
    other = extend_cache(str(tmp_path), "fp-other", {"z": np.ones((2, 3), np.float32)})
    assert other.ids() == ["z"] and other.fingerprint == "fp-other"


def test_an_interrupted_rewrite_leaves_the_cache_that_was_there(tmp_path):
    write_cache(str(tmp_path), "fp", [("a", np.ones((2, 3), np.float32))])

    def rows():
        yield "b", np.full((2, 3), 7.0, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(str(tmp_path), "fp", rows(), shard_rows=1)  # one shard of it written, no index
    cache = reusable_cache(str(tmp_path), "fp", ["a"])
    assert cache is not None and cache.ids() == ["a"]
    np.testing.assert_array_equal(cache["a"], np.ones((2, 3), np.float32))


def test_front_end_memo_computes_a_batch_it_lacks_and_reads_back_one_it_holds(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        hidden = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
        return hidden, np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])

    memo = FrontEndMemo(str(tmp_path / "eval"), "fp")
    rows, width = memo.rows(["x", "y"], compute, lambda: 6)
    assert width == 6 and [r.shape[0] for r in rows] == [3, 5] and len(calls) == 1
    memo.save()
    again = FrontEndMemo(str(tmp_path / "eval"), "fp")
    rows2, width2 = again.rows(["y", "x"], compute, lambda: 6)
    assert len(calls) == 1 and width2 == 6 and (again.hits, again.misses) == (2, 0)
    np.testing.assert_array_equal(rows2[0], rows[1])
    # A batch with one example it lacks runs the front end whole and keeps only the new one.
    again.rows(["x", "w"], compute, lambda: 6)
    assert len(calls) == 2 and sorted(again.new) == ["w"] and again.misses == 1
    # Another front end's cache is not read.
    assert FrontEndMemo(str(tmp_path / "eval"), "fp-other").cache is None


def test_a_damaged_cache_is_not_read_and_is_written_again(tmp_path):
    """An index that is not JSON (a damaged disk, a hand edit) counts as no cache: nothing is read
    from it, and the memo's save writes a whole new one instead of failing."""
    directory = tmp_path / "eval"
    write_cache(str(directory), "fp", [("a", np.ones((2, 3), np.float32))])
    (directory / "index.json").write_text("{not json")
    assert reusable_cache(str(directory), "fp", ()) is None
    memo = FrontEndMemo(str(directory), "fp")
    assert memo.cache is None
    memo.rows(["b"], lambda: (np.ones((1, 4, 3), np.float32), np.array([[1, 1, 0, 0]])), lambda: 4)
    memo.save()
    assert reusable_cache(str(directory), "fp", ["b"]).ids() == ["b"]
