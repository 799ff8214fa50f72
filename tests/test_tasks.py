"""SeqIO tasks, mixtures, the feature converter and the SeqioData training source."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from corpus_fixture import copy_corpus, small_corpus, use_corpus

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from slm_jax.data import audio as audio_lib  # noqa: E402
from slm_jax.data.corpus import builder as corpus  # noqa: E402
from slm_jax.data.errors import CorruptShardError, DataError, DataNotPreparedError  # noqa: E402
from slm_jax.data.seqio.feature_converter import SpeechFeatureConverter, task_feature_lengths  # noqa: E402
from slm_jax.data.seqio.source import SeqioData, UnknownTaskError, get_provider  # noqa: E402

LENGTHS = {"audio_frames": 512, "prefix": 64, "suffix": 8, "targets": 32}


@pytest.fixture()
def registered():
    root = small_corpus()
    use_corpus(root)
    return root


def _examples(task, split, n=None):
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                          trim_output_features=False, try_in_mem_cache=False)
    if n:
        ds = ds.take(n)
    return list(ds.as_numpy_iterator())


@pytest.mark.slow
def test_every_corpus_task_yields_well_formed_examples(registered):
    from slm_jax import tasks

    manifest = corpus.load_manifest(registered)
    names = tasks.corpus_task_names()
    assert set(names) == set(corpus.TASKS)
    for name in names:
        task = seqio.get_mixture_or_task(name)
        vocab = task.output_features["targets"].vocabulary
        split = task.splits[0]
        examples = _examples(task, split)
        assert len(examples) == manifest["tasks"][name]["splits"][split]["examples"] > 0
        raw = {ex["id"]: ex for p in corpus.shard_paths(registered, manifest, name, split)
               for ex in corpus.read_examples(p)}
        for ex in examples:
            source = raw[ex["id"].decode()]
            feats = ex["audio_features"]
            assert feats.dtype == np.float32 and feats.shape == (source["num_samples"] // 160, 80)
            assert np.all(np.isfinite(feats))
            assert ex["targets"].dtype == np.int32 and ex["targets"][-1] == vocab.eos_id
            assert vocab.decode(ex["targets"][:-1].tolist()) == source["target"]
            # T5 layout: the instruction before the speech, nothing after it, decoding starts at pad.
            assert vocab.decode(ex["prefix"].tolist()) == source["instruction"]
            assert ex["suffix"].size == 0 and ex["decoder_start"] == 0


def test_pipeline_log_mel_equals_the_numpy_front_end(registered):
    manifest = corpus.load_manifest(registered)
    path = corpus.shard_paths(registered, manifest, "asr_fr", "train")[0]
    raw = next(corpus.read_examples(path))
    ex = next(e for e in _examples(seqio.get_mixture_or_task("asr_fr"), "train") if e["id"].decode() == raw["id"])
    np.testing.assert_array_equal(ex["audio_features"], audio_lib.log_mel_spectrogram(raw["audio"]))
    # And the TF wrapper itself, on a fresh signal.
    x = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    np.testing.assert_allclose(audio_lib.tf_log_mel_spectrogram(tf.constant(x)).numpy(),
                               audio_lib.log_mel_spectrogram(x), rtol=0, atol=0)


def test_mixture_rates_are_proportional_to_task_sizes(registered):
    manifest = corpus.load_manifest(registered)
    mix = seqio.get_mixture_or_task("asr_ast_instruct")
    train_sizes = {n: i["splits"].get("train", {}).get("examples", 0) for n, i in manifest["tasks"].items()
                   if not i["zero_shot"]}
    assert {t.name for t in mix.tasks} == set(train_sizes)  # every training task, no zero-shot task
    total = sum(train_sizes.values())
    for task in mix.tasks:
        assert mix.get_rate(task) / mix.total_rate == pytest.approx(train_sizes[task.name] / total)
    asr = seqio.get_mixture_or_task("asr")
    assert sorted(t.name for t in asr.tasks) == ["asr_de", "asr_en", "asr_es", "asr_fr"]
    for name in corpus.TASKS:
        if corpus.TASKS[name].zero_shot:
            assert seqio.get_mixture_or_task(name).splits == ("test",)


def test_rate_multipliers_scale_a_tasks_rate_in_both_mixtures(registered):
    from slm_jax.tasks import corpus_tasks

    try:
        corpus_tasks.register_corpus_tasks(registered, rate_multipliers={"asr_en": 3})
        for name in ("asr_ast_instruct", "asr"):
            mix = seqio.get_mixture_or_task(name)
            for task in mix.tasks:
                size = task.source.num_input_examples("train")
                assert mix.get_rate(task) == (3 if task.name == "asr_en" else 1) * size, (name, task.name)
        with pytest.raises(ValueError, match=r"not training tasks of the corpus .*\['zeroshot_which_colour'\]"):
            corpus_tasks.register_corpus_tasks(registered, rate_multipliers={"zeroshot_which_colour": 2})
        with pytest.raises(ValueError, match=r"rate_multipliers\['asr_en'\] must be a whole number >= 1, got 0"):
            corpus_tasks.register_corpus_tasks(registered, rate_multipliers={"asr_en": 0})
    finally:
        use_corpus(registered)


def test_the_registry_holds_what_the_corpus_manifest_holds(tmp_path):
    """A task of imported recordings (not one the generator knows) is registered and mixed as its
    manifest describes it; a default task the corpus lacks stays out of the mixtures (it says so
    when used on its own)."""
    import json

    from slm_jax import tasks

    root = copy_corpus(tmp_path)
    path = os.path.join(root, corpus.MANIFEST)
    manifest = json.load(open(path))
    manifest["tasks"]["asr_recorded"] = dict(manifest["tasks"].pop("instruct_count"), family="asr")
    del manifest["tasks"]["asr_es"]
    json.dump(manifest, open(path, "w"))
    try:
        names = tasks.corpus_tasks.register_corpus_tasks(root)
        assert "asr_recorded" in names and "asr_es" in names
        training = {t.name for t in seqio.get_mixture_or_task("asr_ast_instruct").tasks}
        assert "asr_recorded" in training and not {"asr_es", "instruct_count"} & training
        assert {t.name for t in seqio.get_mixture_or_task("asr").tasks} == {"asr_de", "asr_en", "asr_fr", "asr_recorded"}
        assert seqio.get_mixture_or_task("asr_recorded").splits == tuple(
            s for s in corpus.SPLITS if manifest["tasks"]["asr_recorded"]["splits"].get(s, {}).get("examples"))
        with pytest.raises(DataNotPreparedError, match=r"task asr_es: the corpus in .* has no such task"):
            SeqioData("asr_es", LENGTHS).task_dataset("train", shuffle=False, seed=0)
    finally:
        use_corpus(small_corpus())


def test_corpus_source_examples_are_the_shard_records_in_order(registered):
    from slm_jax.tasks import corpus_tasks

    manifest = corpus.load_manifest(registered)
    source = seqio.get_mixture_or_task("asr_en").source
    got = list(source.examples("train"))
    want = [ex for p in corpus.shard_paths(registered, manifest, "asr_en", "train") for ex in corpus.read_examples(p)]
    assert len(got) == manifest["tasks"]["asr_en"]["splits"]["train"]["examples"] > 4  # several shards
    for x, y in zip(got, want, strict=True):
        assert x.keys() == y.keys() and np.array_equal(x["audio"], y["audio"]) and x["audio"].dtype == np.float32
        assert all(x[k] == y[k] for k in x if k != "audio")
    assert [e["id"] for e in corpus_tasks.corpus_examples(registered, ["train"], ["asr_en"])] == [e["id"] for e in want]


@pytest.mark.slow
def test_mixture_samples_tasks_at_their_rates(registered):
    data = SeqioData("asr_ast_instruct", LENGTHS)
    ds = data.task_dataset("train", shuffle=True, seed=0).take(600)
    seen = {}
    for ex in ds.map(lambda e: {"task": e["task"]}).as_numpy_iterator():
        seen[ex["task"].decode()] = seen.get(ex["task"].decode(), 0) + 1
    mix = seqio.get_mixture_or_task("asr_ast_instruct")
    for task in mix.tasks:
        expected = mix.get_rate(task) / mix.total_rate
        assert seen.get(task.name, 0) / 600 == pytest.approx(expected, abs=0.05), task.name


def test_feature_converter_masks_match_lengths(registered):
    task = seqio.get_mixture_or_task("instruct_biasing")
    examples = _examples(task, "train", 3)
    keys = list(SpeechFeatureConverter.TASK_FEATURES)
    ds = tf.data.Dataset.from_generator(
        lambda: ({k: e[k] for k in keys} for e in examples),
        output_signature={"audio_features": tf.TensorSpec([None, 80], tf.float32),
                          "prefix": tf.TensorSpec([None], tf.int32), "suffix": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32), "decoder_start": tf.TensorSpec([], tf.int32)})
    converted = list(SpeechFeatureConverter()(ds, task_feature_lengths(LENGTHS)).as_numpy_iterator())
    for ex, out in zip(examples, converted, strict=True):
        frames, nt = ex["audio_features"].shape[0], ex["targets"].size
        assert out["audio_features"].shape == (512, 80)
        assert out["audio_mask"].tolist() == [1] * frames + [0] * (512 - frames)
        np.testing.assert_array_equal(out["audio_features"][:frames], ex["audio_features"])
        assert not out["audio_features"][frames:].any()
        assert out["prefix_mask"].sum() == ex["prefix"].size and out["suffix_mask"].sum() == ex["suffix"].size
        assert out["prefix_tokens"][: ex["prefix"].size].tolist() == ex["prefix"].tolist()
        assert out["target_mask"].tolist() == [1] * nt + [0] * (32 - nt)
        assert out["target_tokens"][:nt].tolist() == ex["targets"].tolist()
        assert out["decoder_input_tokens"][:nt].tolist() == [0] + ex["targets"][:-1].tolist()
        assert not out["decoder_input_tokens"][nt:].any() and not out["target_tokens"][nt:].any()


def test_batches_have_the_model_signature(registered):
    from slm_jax.models.spec import sample_batch

    batch = next(SeqioData("asr_en", LENGTHS).train_batches(4, seed=0))
    signature = sample_batch(4, LENGTHS)
    assert set(batch) == set(signature)
    for k, spec in signature.items():
        assert batch[k].shape == spec.shape and batch[k].dtype == spec.dtype, k


def test_inference_gets_the_prompt_layout_and_vocabulary_training_used(registered):
    """slm-infer / slm-eval build prompts from the data source: with no layout configured it must
    report the one the tasks were registered with (it once reported None and inference crashed)."""
    from slm_jax.data.prompting import CHATML_PROMPT, T5_PROMPT

    data = SeqioData("asr_en", LENGTHS)
    assert data.prompt_format == T5_PROMPT
    example = next(data.task_dataset("train", shuffle=False, seed=None,
                                     passthrough=("id", "task", "instruction")).as_numpy_iterator())
    prompt = data.prompt_format.encode(data.vocabulary, example["instruction"].decode())
    assert list(prompt.prefix) == example["prefix"].tolist() and list(prompt.suffix) == example["suffix"].tolist()
    assert SeqioData("asr_en", LENGTHS, prompt_format=CHATML_PROMPT).prompt_format == CHATML_PROMPT


@pytest.mark.slow  # builds several full pipelines: about 30 s measured on a busy 2-core machine
def test_training_order_is_deterministic_and_resumable(registered):
    # The ASR mixture (4 tasks) keeps this fast; the order logic is the same for every mixture.
    data = SeqioData("asr", LENGTHS)
    first = data.train_batches(4, seed=7)
    fresh = [next(first) for _ in range(6)]
    # A second pipeline started at batch 4 (what a resumed run does) continues exactly.
    resumed = data.train_batches(4, seed=7, start_batch=4)
    for want in fresh[4:6]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not all(np.array_equal(fresh[0][k], fresh[4][k]) for k in fresh[0])
    other = next(data.train_batches(4, seed=8))
    assert not np.array_equal(other["audio_mask"], fresh[0]["audio_mask"])
    # Two hosts read different rows.
    host0 = next(data.train_batches(4, seed=7, shard_index=0, num_shards=2))
    host1 = next(data.train_batches(4, seed=7, shard_index=1, num_shards=2))
    assert not np.array_equal(host0["audio_mask"], host1["audio_mask"])
    ev1, ev2 = list(data.eval_batches(2, 2)), list(data.eval_batches(2, 2))
    assert len(ev1) == 2 and all(np.array_equal(a[k], b[k]) for a, b in zip(ev1, ev2) for k in a)


def test_unknown_names_list_close_matches(registered):
    with pytest.raises(UnknownTaskError, match=r"'asr_ast_instuct'.*did you mean asr_ast_instruct"):
        get_provider("asr_ast_instuct")
    with pytest.raises(UnknownTaskError, match=r"did you mean .*ast_en_fr"):
        get_provider("ast_en_fre")


def test_example_longer_than_feature_lengths_is_named(registered):
    data = SeqioData("instruct_biasing", dict(LENGTHS, prefix=8))
    with pytest.raises(DataError, match=r"instruct_biasing example instruct_biasing-\d+: \d+ prefix tokens, more "
                                        r"than feature_lengths\['prefix'\] = 8"):
        next(data.train_batches(2, seed=0))


def test_missing_corpus_raises_data_not_prepared(tmp_path):
    missing = str(tmp_path / "nowhere")
    data = SeqioData("asr_ast_instruct", LENGTHS, corpus_dir=missing)
    with pytest.raises(DataNotPreparedError, match=rf"no corpus in {missing}.*slm-make-corpus --out={missing}"):
        next(data.train_batches(2, seed=0))


def test_corrupt_shards_are_named(tmp_path):
    root = copy_corpus(tmp_path)
    manifest = corpus.load_manifest(root)
    path = corpus.shard_paths(root, manifest, "asr_en", "train")[0]
    data = open(path, "rb").read()
    # Garbled payload (same length): framing is fine, the record CRC is not.
    garbled = bytearray(data)
    garbled[200:260] = bytes(60)
    open(path, "wb").write(bytes(garbled))
    with pytest.raises(CorruptShardError, match=rf"{path}: record 0 is unreadable"):
        next(SeqioData("asr_en", LENGTHS, corpus_dir=root).train_batches(2, seed=0))
    # Truncated: found by the framing check before anything is read.
    open(path, "wb").write(data[:-50])
    with pytest.raises(CorruptShardError, match=rf"{path}: truncated in record"):
        next(SeqioData("asr_en", LENGTHS, corpus_dir=root).train_batches(2, seed=0))


def test_corpus_source_examples_name_a_corrupt_record(tmp_path):
    from slm_jax.tasks import corpus_tasks

    root = copy_corpus(tmp_path)
    path = corpus.shard_paths(root, corpus.load_manifest(root), "asr_en", "train")[1]
    garbled = bytearray(open(path, "rb").read())
    garbled[200:260] = bytes(60)
    open(path, "wb").write(bytes(garbled))
    with pytest.raises(CorruptShardError, match=rf"{path}: record 0 is unreadable"):
        list(corpus_tasks.CorpusSource(root, "asr_en").examples("train"))


def _rewrite_first_record(root: str, task: str, **changes) -> str:
    manifest = corpus.load_manifest(root)
    path = corpus.shard_paths(root, manifest, task, "train")[0]
    examples = list(corpus.read_examples(path))
    with tf.io.TFRecordWriter(path) as writer:
        for i, ex in enumerate(examples):
            pcm = audio_lib.to_pcm16(ex["audio"])
            fields = {k: ex[k] for k in ("id", "task", "split", "lang", "text", "instruction", "target")}
            if i == 0:
                pcm = changes.pop("pcm", lambda p: p)(pcm)
                fields.update(changes)
            record = corpus.serialize_example(types.SimpleNamespace(**fields), pcm)
            if i == 0 and "declared" in fields:  # keep the declared length of the original audio
                parsed = tf.train.Example.FromString(record)
                parsed.features.feature["num_samples"].int64_list.value[0] = len(ex["audio"])
                record = parsed.SerializeToString()
            writer.write(record)
    return examples[0]["id"]


def test_empty_target_is_an_error_naming_the_example(tmp_path):
    root = copy_corpus(tmp_path)
    bad = _rewrite_first_record(root, "asr_de", target="")
    with pytest.raises(DataError, match=rf"asr_de example {bad}: empty target text"):
        for _ in zip(range(50), SeqioData("asr_de", LENGTHS, corpus_dir=root).train_batches(1, seed=0)):
            pass


def test_audio_that_does_not_decode_is_an_error_naming_the_example(tmp_path):
    root = copy_corpus(tmp_path)
    bad = _rewrite_first_record(root, "asr_es", pcm=lambda p: p[:-3], declared=True)
    with pytest.raises(DataError, match=rf"asr_es example {bad}: the record declares \d+ audio samples but holds"):
        for _ in zip(range(50), SeqioData("asr_es", LENGTHS, corpus_dir=root).train_batches(1, seed=0)):
            pass


def test_real_corpus_tasks_register_and_explain_how_to_prepare(tmp_path, monkeypatch):
    from slm_jax import tasks

    names = tasks.real_task_names()
    assert {"librispeech_asr", "fleurs_asr_en", "fleurs_asr_fr", "covost2_en_de", "covost2_fr_en",
            "voxpopuli_asr_en", "voxpopuli_asr_es"} <= set(names)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DataNotPreparedError, match=r"librispeech:2\.1\.1 is not prepared in .*tfds build librispeech"):
        SeqioData("librispeech_asr", LENGTHS).task_dataset("train", shuffle=False, seed=0)
    with pytest.raises(DataNotPreparedError, match=r"fleurs\.fr_fr.*tfds build xtreme_s --config fleurs\.fr_fr"):
        SeqioData("fleurs_asr_fr", LENGTHS).task_dataset("train", shuffle=False, seed=0)
    tasks.register_real_corpus_tasks(seqio.ByteVocabulary(), covost2_dir=str(tmp_path / "cv"),
                                     voxpopuli_dir=str(tmp_path / "vp"))
    with pytest.raises(DataNotPreparedError, match=r"covost_v2\.fr_en\.train\.tsv not found.*get_covost_splits"):
        SeqioData("covost2_fr_en", LENGTHS).task_dataset("train", shuffle=False, seed=0)
    with pytest.raises(DataNotPreparedError, match=r"asr_dev\.tsv not found.*voxpopuli\.get_asr_data"):
        SeqioData("voxpopuli_asr_de", LENGTHS).task_dataset("validation", shuffle=False, seed=0)


def test_voxpopuli_local_manifest_reads_its_own_format(tmp_path):
    import soundfile

    from slm_jax import tasks

    lang_dir = tmp_path / "vp" / "transcribed_data" / "fr"
    (lang_dir / "2019").mkdir(parents=True)
    rate = 24000  # not 16 kHz: the reader resamples
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    soundfile.write(lang_dir / "2019" / "20190101-0900-PLENARY-3_fr.ogg", tone, rate)
    (lang_dir / "asr_train.tsv").write_text(
        "id\traw_text\tnormalized_text\tspeaker_id\tsplit\tgender\tis_gold_transcript\taccent\n"
        "20190101-0900-PLENARY-3_fr\tBonjour à tous.\tbonjour à tous\t1\ttrain\tmale\tTrue\tNone\n")
    vocab = seqio.ByteVocabulary()
    tasks.register_real_corpus_tasks(vocab, voxpopuli_dir=str(tmp_path / "vp"))
    try:
        [ex] = _examples(seqio.get_mixture_or_task("voxpopuli_asr_fr"), "train")
        assert ex["audio_features"].shape == (100, 80)  # 1 s at 16 kHz
        assert vocab.decode(ex["targets"][:-1].tolist()) == "Bonjour à tous."
    finally:
        use_corpus(small_corpus())  # back to the default registration


def test_chatml_prompt_tokens_match_inference_encoding(registered):
    """With a real LLM's tokenizer and chat layout, the pipeline builds exactly the prompt that
    PromptFormat.encode (what slm-infer uses) builds."""
    from slm_jax.data import batching
    from slm_jax.data.prompting import CHATML_PROMPT

    try:
        from slm_jax.weights.tokenizers import GgufBpeVocabulary

        GgufBpeVocabulary.from_smollm2().vocab_size
    except Exception as e:  # noqa: BLE001 - the weights package is optional for this check
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    data = SeqioData("asr_en", LENGTHS, corpus_dir=registered, vocabulary="package:smollm2-135m-instruct",
                     prompt_format=CHATML_PROMPT)
    try:
        vocab = data.vocabulary
        for ex in _examples(seqio.get_mixture_or_task("asr_en"), "train", 3):
            want = CHATML_PROMPT.encode(vocab, ex["instruction"].decode())
            assert ex["prefix"].tolist() == want.prefix and ex["suffix"].tolist() == want.suffix
            assert int(ex["decoder_start"]) == want.decoder_start
            assert ex["targets"].tolist() == batching.target_ids(vocab, ex["target"].decode())
    finally:
        use_corpus(registered)
