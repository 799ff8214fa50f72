"""CachedCorpusData reads its examples from the SeqIO registry and samples at the mixture's rates.

The reference below is the shard-by-shard reading the cached-encoder source used before it read
through the registry (every non-zero-shot task of the manifest in name order, each shard's records
in file order, ``task_repeats`` copies of each training example in a row): the registry path must
give the same examples, so the same batch ``k`` for every seed, and measured numbers do not move.
"""

from __future__ import annotations

import hashlib
import itertools
import types

import numpy as np
import pytest

from corpus_fixture import small_corpus, use_corpus

pytest.importorskip("seqio")

from slm_jax.data.cached import corpus_data  # noqa: E402
from slm_jax.data.cached.corpus_data import CachedCorpusData, copies_per_example, read_corpus  # noqa: E402
from slm_jax.data.cached.encoder_cache import CachedSpeechData, write_cache  # noqa: E402
from slm_jax.data.corpus import builder as corpus  # noqa: E402
from slm_jax.data.errors import DataError  # noqa: E402
from slm_jax.data.prompting import PromptFormat  # noqa: E402
from slm_jax.data.vocabularies import load_vocabulary  # noqa: E402

pytestmark = pytest.mark.slow  # a module-scoped fixture or every test here takes seconds


FINGERPRINT = "test-front-end"


@pytest.fixture(autouse=True)
def _default_registration():
    yield
    use_corpus(small_corpus())  # CachedCorpusData registers the corpus tasks; leave the default behind


def _reference_examples(corpus_dir, splits, tasks=None, include_zero_shot=False):
    """The examples as the shard reader gives them (``builder.read_examples``), tasks in name order."""
    manifest = corpus.load_manifest(corpus_dir)
    out = []
    for task, info in sorted(manifest["tasks"].items()):
        if (tasks is not None and task not in tasks) or (info["zero_shot"] and not include_zero_shot):
            continue
        for split in splits:
            if split in info["splits"]:
                for path in corpus.shard_paths(corpus_dir, manifest, task, split):
                    out.extend(corpus.read_examples(path))
    return out


def _reference_source(corpus_dir, cache, vocabulary, prompt_format, task_repeats=None, tasks=None):
    """The cached source as built from the reference reading: proportional mixing by listing every
    training example once, ``task_repeats`` times for the named tasks."""
    train = [ex for ex in _reference_examples(corpus_dir, ["train"], tasks)
             for _ in range((task_repeats or {}).get(ex["task"], 1))]
    evaluation = _reference_examples(corpus_dir, ["validation"], tasks)
    _, lengths = corpus_data.corpus_lengths(vocabulary, prompt_format, train + evaluation, cache.frames)
    return CachedSpeechData(cache, train, evaluation, vocabulary, prompt_format, **lengths)


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) and np.asarray(a[k]).dtype == np.asarray(b[k]).dtype for k in a)


@pytest.fixture()
def cached(tmp_path, monkeypatch):
    """A front end's cache of the small corpus (made-up rows of made-up lengths, keyed by id) and a
    CachedCorpusData factory that finds it, so attach_model needs no encoder."""
    root = small_corpus()
    every = _reference_examples(root, corpus.SPLITS, include_zero_shot=True)

    def rows(ex):
        seed = int.from_bytes(hashlib.sha256(ex["id"].encode()).digest()[:4], "big")
        frames = 8 + len(ex["audio"]) // 320 + seed % 50
        return ex["id"], np.random.default_rng(seed).standard_normal((frames, 6)).astype(np.float32)

    cache = write_cache(str(tmp_path / "cache"), FINGERPRINT, (rows(ex) for ex in every))
    monkeypatch.setattr(corpus_data, "front_end_fingerprint", lambda model_spec: FINGERPRINT)

    def make(**kwargs):
        data = CachedCorpusData(root, f"corpus:{root}", PromptFormat(), cache_dir=cache.directory, **kwargs)
        data.attach_model(None, None, types.SimpleNamespace(speech_encoder=types.SimpleNamespace()))
        return data

    return root, cache, make


@pytest.mark.parametrize("task_repeats,tasks", [(None, None), ({"asr_en": 3, "instruct_qa": 2}, None),
                                                ({"asr_en": 2}, ["asr_en", "asr_fr", "instruct_qa"])])
def test_registry_path_gives_the_shard_readers_examples_and_batches(cached, task_repeats, tasks):
    root, cache, make = cached
    data = make(task_repeats=task_repeats, tasks=tasks)
    new = data._data
    old = _reference_source(root, cache, data.vocabulary, data.prompt_format, task_repeats, tasks)
    # The same examples (every field, audio included) in the same order.
    assert [e["id"] for e in new.train_examples] == [e["id"] for e in old.train_examples]
    assert [e["id"] for e in new.eval_examples] == [e["id"] for e in old.eval_examples]
    for x, y in zip(new.train_examples + new.eval_examples, old.train_examples + old.eval_examples, strict=True):
        assert x.keys() == y.keys() and np.array_equal(x["audio"], y["audio"])
        assert all(x[k] == y[k] for k in x if k != "audio")
    assert new.lengths == old.lengths
    # So batch k (its example ids and every array) is the same for every seed.
    for seed, batch_size in ((0, 4), (5, 3)):
        for k in range(40):
            assert ([new.train_examples[i]["id"] for i in new._indices(seed, k, batch_size)]
                    == [old.train_examples[i]["id"] for i in old._indices(seed, k, batch_size)])
        for got, want in zip(itertools.islice(data.train_batches(batch_size, seed), 40),
                             itertools.islice(old.train_batches(batch_size, seed), 40)):
            assert _equal(got, want)
    for got, want in zip(data.eval_batches(2, 3), old.eval_batches(2, 3), strict=True):
        assert _equal(got, want)


def test_task_repeats_are_the_registry_mixtures_rate_multipliers(cached):
    root, _, make = cached
    data = make(task_repeats={"asr_en": 3})
    mixture = data.registered_mixture()
    sizes = {t.name: t.source.num_input_examples("train") for t in mixture.tasks}
    assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {n: (3 if n == "asr_en" else 1) * s
                                                                    for n, s in sizes.items()}
    train = data._data.train_examples
    assert sum(ex["task"] == "asr_en" for ex in train) == 3 * sizes["asr_en"]
    assert [ex["id"] for ex in train].count(next(ex["id"] for ex in train if ex["task"] == "asr_en")) == 3
    # Without them: the paper's proportional mixing, every training example once.
    assert [ex["id"] for ex in make()._data.train_examples] == [
        ex["id"] for ex in _reference_examples(root, ["train"])]


def test_task_repeats_refuse_unknown_tasks_and_bad_counts(cached):
    _, _, make = cached
    with pytest.raises(ValueError, match=r"not training tasks of the corpus in .*: \['asr_xx'\].*'asr_en'"):
        make(task_repeats={"asr_xx": 2})
    with pytest.raises(ValueError, match=r"task_repeats\['asr_en'\] must be a whole number >= 1, got 0.5"):
        CachedCorpusData("corpus", "unused", PromptFormat(), task_repeats={"asr_en": 0.5})
    with pytest.raises(DataError, match=r"tasks that are not in the mixture asr_ast_instruct: \['zeroshot_which_colour'\]"):
        make(tasks=["asr_en", "zeroshot_which_colour"])


def test_the_default_mixture_is_the_registrys_training_mixture():
    from slm_jax.tasks import corpus_tasks

    assert corpus_data.TRAINING_MIXTURE == corpus_tasks.TRAINING_MIXTURE


def test_a_rate_is_listed_as_whole_copies_of_each_example():
    assert copies_per_example(12.0, 4, "asr_en") == 3
    assert copies_per_example(0.0, 0, "asr_en") == 0
    with pytest.raises(DataError, match=r"task asr_en: mixture rate 10 is not a whole multiple of its 4 training"):
        copies_per_example(10.0, 4, "asr_en")


def test_read_corpus_reads_through_the_registry_source_as_the_shard_reader_does():
    root = small_corpus()
    for splits, tasks, zero_shot in ((["train", "validation", "test"], None, True), (["test"], ["asr_de"], False),
                                     (["test"], None, False)):
        got = read_corpus(root, splits, tasks, include_zero_shot=zero_shot)
        want = _reference_examples(root, splits, tasks, zero_shot)
        assert got and [e["id"] for e in got] == [e["id"] for e in want]
        assert all(np.array_equal(x["audio"], y["audio"]) and all(x[k] == y[k] for k in x if k != "audio")
                   for x, y in zip(got, want))
    assert {e["task"] for e in read_corpus(root, ["test"], include_zero_shot=True)} >= {"zeroshot_which_colour"}


def test_configuration_needs_no_corpus():
    """slm-infer reads the vocabulary and shapes of a config whose corpus it never reads."""
    data = CachedCorpusData("nowhere", "byte", PromptFormat(), max_prompt_tokens=32)
    assert data.vocabulary.vocab_size == load_vocabulary("byte").vocab_size
    assert data.feature_lengths == {"audio_frames": 3000, "prefix": 32, "suffix": 32, "targets": 64}
