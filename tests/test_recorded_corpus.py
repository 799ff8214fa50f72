"""slm-import-speech (slm_jax/data/corpus/recorded.py): real recordings -> the synthetic corpus's format.

The recordings are eight Free Spoken Digit Dataset files in tests/data/recorded/fsdd (two of each
of four speakers; SOURCES.md gives their origin and licence).
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from slm_jax.cli import import_speech
from slm_jax.data import audio as audio_lib
from slm_jax.data.corpus import builder, recorded
from slm_jax.data.errors import DataError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "recorded", "fsdd")
HELDOUT = os.path.join(HERE, "..", "release", "real_speech")
FSDD_REPO = "Jakobovski/free-spoken-digit-dataset"
WORDS = {"0": "Zero.", "1": "One.", "2": "Two.", "3": "Three.", "5": "Five.", "7": "Seven.", "8": "Eight.",
         "9": "Nine."}
QUIET = recorded.ImportOptions(progress=False)


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def fsdd_snapshot(tmp_path):
    """The fixture as one commit of a git repository laid out like FSDD's (recordings/, README.md)."""
    work = tmp_path / "fsdd_work"
    shutil.copytree(FIXTURE, work)
    (work / "README.md").write_text("# Free Spoken Digit Dataset\n\n### License\n"
                                    "[Creative Commons Attribution-ShareAlike 4.0 International]\n")
    _git(work, "init", "-q")
    _git(work, "add", ".")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "recordings")
    return str(work / ".git"), _git(work, "rev-parse", "HEAD")


def _all_examples(out, manifest, task="asr_en"):
    examples = {}
    for split in builder.SPLITS:
        builder.check_task_split(out, manifest, task, split)  # framing and counts, as every reader does first
        for path in builder.shard_paths(out, manifest, task, split):
            for ex in builder.read_examples(path):
                examples[ex["id"]] = ex
    return examples


def test_import_from_a_git_snapshot_records_every_source_and_reads_back(tmp_path, fsdd_snapshot):
    git_dir, commit = fsdd_snapshot
    out = str(tmp_path / "corpus")
    collection = recorded.GitSnapshot(git_dir, "HEAD", repo=FSDD_REPO)
    manifest = recorded.import_collection(collection, recorded.PRESETS["fsdd"], out, QUIET)

    assert manifest == json.load(open(os.path.join(out, builder.MANIFEST)))
    assert builder.load_manifest(out)["format"] == builder.FORMAT
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".corpus.tmp")]  # the temporary sibling is gone
    # Every file: repository, commit, path, licence, content hash.
    sources = manifest["sources"]
    assert sorted(s["path"] for s in sources) == sorted(f"recordings/{n}" for n in os.listdir(
        os.path.join(FIXTURE, "recordings")))
    for s in sources:
        assert (s["repo"], s["commit"], s["licence"], s["label"]) == (FSDD_REPO, commit, "CC-BY-SA-4.0", "given")
        with open(os.path.join(FIXTURE, s["path"]), "rb") as f:
            assert s["sha256"] == recorded.hashlib.sha256(f.read()).hexdigest()
    collection_info = manifest["recorded"]["collection"]
    assert (collection_info["repo"], collection_info["commit"], collection_info["licence_file"]["path"]) == (
        FSDD_REPO, commit, "README.md")
    # The shards read back with the project's reader: 16 kHz audio, the digit as its word.
    examples = _all_examples(out, manifest)
    assert len(examples) == 8
    by_id = recorded.sources_by_id(manifest)
    for eid, ex in examples.items():
        source = by_id[eid]
        digit = os.path.basename(source["path"])[0]
        assert ex["text"] == ex["target"] == WORDS[digit]
        assert ex["task"] == "asr_en" and ex["lang"] == "en" and ex["split"] == source["split"]
        assert ex["instruction"] in {i.format(language="English") for i in builder.ASR_INSTRUCTIONS}
        original, rate = soundfile.read(os.path.join(FIXTURE, source["path"]))
        assert rate == 8000 and source["sample_rate"] == 8000
        assert abs(ex["audio"].size - 2 * original.size) <= 1  # resampled to 16 kHz
        assert ex["num_samples"] == ex["audio"].size
    total = sum(manifest["tasks"]["asr_en"]["splits"][s]["examples"] for s in builder.SPLITS)
    assert total == 8 and manifest["excluded"] == []


def test_splits_hold_whole_speakers(tmp_path):
    out = str(tmp_path / "corpus")
    manifest = recorded.import_collection(recorded.LocalFolder(FIXTURE), recorded.PRESETS["fsdd"], out, QUIET)
    speakers = manifest["recorded"]["speakers"]
    assert sorted(sum(speakers.values(), [])) == ["george", "jackson", "lucas", "theo"]
    assert all(speakers[s] for s in builder.SPLITS)  # every split holds a speaker
    for a in builder.SPLITS:
        for b in builder.SPLITS:
            if a != b:
                assert not set(speakers[a]) & set(speakers[b])
    for s in manifest["sources"]:
        assert s["speaker"] in speakers[s["split"]]
    assert {ex["split"] for ex in _all_examples(out, manifest).values()} == set(builder.SPLITS)


def test_split_speakers_rules():
    counts = {f"s{i}": 10 for i in range(20)}
    split = recorded.split_speakers(counts, seed=3)
    assert split == recorded.split_speakers(dict(reversed(list(counts.items()))), seed=3)  # order-free
    assert sorted(split.values()).count("test") == 2 and sorted(split.values()).count("validation") == 2
    assert recorded.split_speakers(counts, seed=4) != split
    fixed = recorded.split_speakers(counts, fixed={"s7": "test"})
    assert [s for s, sp in fixed.items() if sp == "test"] == ["s7"]  # a split with a named speaker holds only those
    with pytest.raises(DataError, match="none left for train"):
        recorded.split_speakers({"a": 5, "b": 5})
    with pytest.raises(DataError, match="no files"):
        recorded.split_speakers(counts, fixed={"nobody": "test"})


def test_cli_refuses_an_existing_out_in_one_line(tmp_path, capsys):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = import_speech.main([f"--folder={FIXTURE}", "--preset=fsdd", f"--out={out}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("slm-import-speech: error: --out=") and "already exists" in err and "\n" not in err
    assert sorted(os.listdir(out)) == ["keep.txt"] and not [n for n in os.listdir(tmp_path) if "tmp" in n]


def test_cli_imports_and_mixes(tmp_path, capsys):
    synthetic = str(tmp_path / "synthetic")
    builder.make_corpus(synthetic, 40, languages=["en"], synthesizer="tones", examples_per_shard=4, vocab_size=0,
                        progress=False)
    out, mixed = str(tmp_path / "fsdd"), str(tmp_path / "mixed")
    code = import_speech.main([f"--folder={FIXTURE}", "--preset=fsdd", f"--repo={FSDD_REPO}", f"--out={out}",
                               "--quiet", f"--mix_into={synthetic}", "--share=0.3", f"--mixed_out={mixed}"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "asr_en/train" in printed and "mixed:" in printed
    assert builder.load_manifest(out)["sources"][0]["repo"] == FSDD_REPO
    assert builder.load_manifest(mixed)["mixed"]["share"] == 0.3


def test_help_explains_sources_splits_and_mixing(capsys):
    with pytest.raises(SystemExit) as exit_info:
        import_speech.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--preset", "--transcripts", "--pseudo_labels", "--heldout_dir", "by speaker", "--mix_into",
                   "--share", "release/real_speech", "temporary"):
        assert needle in text


def _write_wav(path, samples, rate):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, samples, rate, subtype="PCM_16")


def test_held_out_recordings_are_never_imported(tmp_path):
    """A copy of a release/real_speech file, and the same recording resampled and quieter, are left out."""
    folder = tmp_path / "collection"
    shutil.copytree(FIXTURE, folder)
    shutil.copy(os.path.join(HELDOUT, "sphinx_goforward.wav"), folder / "recordings" / "4_zed_0.wav")
    samples = audio_lib.load_audio(os.path.join(HELDOUT, "arctic_a0009.wav"))
    _write_wav(str(folder / "recordings" / "6_zed_1.wav"), 0.5 * audio_lib.resample(samples, 16000, 8000), 8000)
    _write_wav(str(folder / "recordings" / "6_zed_2.wav"), 0.3 * np.sin(np.arange(8000) / 5.0), 8000)  # kept
    out = str(tmp_path / "corpus")
    manifest = recorded.import_collection(recorded.LocalFolder(str(folder)), recorded.PRESETS["fsdd"], out, QUIET)
    excluded = {e["path"]: e["reason"] for e in manifest["excluded"]}
    assert {e["kind"] for e in manifest["excluded"]} == {"heldout"}
    assert "sphinx_goforward.wav" in excluded["recordings/4_zed_0.wav"]
    assert "same content" in excluded["recordings/4_zed_0.wav"]
    assert "arctic_a0009.wav" in excluded["recordings/6_zed_1.wav"]
    assert "envelope" in excluded["recordings/6_zed_1.wav"]
    paths = {s["path"] for s in manifest["sources"]}
    assert "recordings/6_zed_2.wav" in paths and not paths & set(excluded)
    assert len(_all_examples(out, manifest)) == 9
    assert manifest["recorded"]["heldout_checked"] == ["release/real_speech"]


def test_held_out_folder_must_exist(tmp_path):
    options = recorded.ImportOptions(progress=False, heldout_dirs=(str(tmp_path / "missing"),))
    with pytest.raises(DataError, match="held-out recordings"):
        recorded.import_collection(recorded.LocalFolder(FIXTURE), recorded.PRESETS["fsdd"], str(tmp_path / "c"),
                                   options)
    assert not os.path.exists(tmp_path / "c")


def test_transcripts_table_and_own_pattern(tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(os.path.join(FIXTURE, "recordings"), folder / "audio")
    rows = ["path\ttranscript\tspeaker"] + [f"audio/{n}\tTHE NUMBER {WORDS[n[0]][:-1].upper()}\t{n.split('_')[1]}"
                                            for n in sorted(os.listdir(folder / "audio")) if "lucas" not in n]
    (folder / "transcripts.tsv").write_text("\n".join(rows) + "\n")
    spec = recorded.SourceSpec(name="mine", transcripts="transcripts.tsv", licence="CC-BY-SA-4.0")
    manifest = recorded.import_collection(recorded.LocalFolder(str(folder)), spec, str(tmp_path / "c"), QUIET)
    texts = {s["path"]: ex["text"] for s in manifest["sources"]
             for ex in [_all_examples(str(tmp_path / "c"), manifest)[s["id"]]]}
    assert texts["audio/3_george_0.wav"] == "The number three."  # sentence style
    reasons = {e["path"]: e["reason"] for e in manifest["excluded"]}
    assert set(reasons) == {"audio/1_lucas_0.wav", "audio/8_lucas_1.wav"} and "speaker" in reasons[
        "audio/1_lucas_0.wav"]
    with pytest.raises(DataError, match="speaker"):
        recorded.SourceSpec(name="x", patterns=(r"(?P<label>\d)_",))


def test_pseudo_label_filter_on_given_scores():
    keep = recorded.PseudoLabelFilter()
    ok = recorded.PseudoLabel("Go forward ten meters.", -0.21, 7, True)
    assert keep.rejection(ok) is None
    low = recorded.dataclasses.replace(ok, mean_log_prob=-0.9)
    assert "confidence -0.900 below -0.5" in keep.rejection(low)
    assert recorded.PseudoLabelFilter(min_mean_log_prob=-1.0).rejection(low) is None
    assert "did not finish" in keep.rejection(recorded.dataclasses.replace(ok, finished=False))
    loop = recorded.dataclasses.replace(ok, text="I am here now. I am here now. I am here now.")
    assert "repeats 'i am here now'" in keep.rejection(loop)
    assert recorded.PseudoLabelFilter(repeat_ngram=0, max_compression_ratio=10).rejection(loop) is None
    jfk = recorded.dataclasses.replace(ok, text="Ask not what your country can do for you, ask what you can do "
                                                "for your country.")
    assert keep.rejection(jfk) is None  # a repeated 3-gram is speech, not a loop
    assert "compression ratio" in recorded.PseudoLabelFilter(repeat_ngram=0).rejection(
        recorded.dataclasses.replace(ok, text="la " * 40))
    assert "0 words" in keep.rejection(recorded.dataclasses.replace(ok, text=" ... "))
    assert keep.rejection(recorded.dataclasses.replace(ok, mean_log_prob=float("nan"))) is not None


def test_pseudo_labels_are_marked_with_their_confidence(tmp_path):
    """Files without a transcript get the labeller's text when it passes the filter; the manifest
    says which labels are pseudo and how sure the labeller was; rejected ones are listed with why."""
    spec = recorded.SourceSpec(name="unlabelled", patterns=(r"_(?P<speaker>[a-z]+)_[0-9]+\.wav$",),
                               pseudo_labels=True, licence="CC-BY-SA-4.0")
    scores = {"george": -0.1, "jackson": -0.2, "lucas": -0.3, "theo": -2.0}
    calls = []

    def labeller(samples):
        calls.append(samples.size)
        speaker = ["george", "jackson", "lucas", "theo"][len(calls) % 4]
        return recorded.PseudoLabel(f"hello {speaker}", scores[speaker], 4, True)

    manifest = recorded.import_collection(recorded.LocalFolder(FIXTURE), spec, str(tmp_path / "c"),
                                          recorded.ImportOptions(progress=False, validation_share=0.0,
                                                                 test_share=0.3), labeller=labeller)
    assert len(calls) == 8
    kept = manifest["sources"]
    assert kept and all(s["label"] == "pseudo" and s["confidence"] >= -0.5 for s in kept)
    rejected = [e for e in manifest["excluded"] if "confidence" in e["reason"]]
    assert rejected and all(e["confidence"] == -2.0 and e["pseudo_label"] == "hello theo" for e in rejected)
    info = manifest["recorded"]["pseudo_labels"]
    assert (info["kept"], info["rejected"]) == (len(kept), len(rejected))
    assert info["filter"]["min_mean_log_prob"] == -0.5
    assert {e["kind"] for e in rejected} == {"pseudo_label_rejected"}
    texts = {ex["text"] for ex in _all_examples(str(tmp_path / "c"), manifest).values()}
    assert texts <= {"Hello george.", "Hello jackson.", "Hello lucas."}


@pytest.mark.slow
def test_whisper_labeller_transcribes_one_short_recording():
    from slm_jax.weights import assets

    if not assets.whisper_base_available():
        pytest.skip("the Whisper-base weight packages are not installed")
    label = recorded.WhisperLabeller()(audio_lib.load_audio(os.path.join(HELDOUT, "sphinx_goforward.wav")))
    assert label.finished and label.mean_log_prob > -0.5, label
    assert "forward" in label.text.lower(), label
    assert recorded.PseudoLabelFilter().rejection(label) is None


def test_mix_adds_recorded_examples_at_the_share(tmp_path):
    synthetic = str(tmp_path / "synthetic")
    syn = builder.make_corpus(synthetic, 60, languages=["en"], synthesizer="tones", examples_per_shard=5,
                              vocab_size=0, progress=False)
    rec = str(tmp_path / "fsdd")
    recorded.import_collection(recorded.LocalFolder(FIXTURE, repo=FSDD_REPO), recorded.PRESETS["fsdd"], rec, QUIET)
    rec_train = builder.load_manifest(rec)["tasks"]["asr_en"]["splits"]["train"]["examples"]
    s = syn["tasks"]["asr_en"]["splits"]["train"]["examples"]

    mixed = str(tmp_path / "mixed")
    manifest = recorded.mix_corpora(synthetic, [rec], mixed, share=0.1)
    r = recorded.recorded_count(s, 0.1)
    assert 0 < r <= rec_train  # drawn without replacement
    assert manifest["tasks"]["asr_en"]["splits"]["train"]["examples"] == s + r
    assert manifest["mixed"]["recorded_train_examples"] == r and manifest["mixed"]["synthetic"]["train_examples"] == s
    examples = _all_examples(mixed, manifest)
    train = [e for e in examples.values() if e["split"] == "train"]
    assert sum(e["id"].startswith("fsdd-") for e in train) == r
    assert all(e["task"] == "asr_en" for e in train)
    # Every other task and split is the synthetic corpus's, file for file.
    for task, info in syn["tasks"].items():
        for split, entry in info["splits"].items():
            if (task, split) != ("asr_en", "train"):
                assert manifest["tasks"][task]["splits"][split] == entry
                for shard in entry["shards"]:
                    with open(os.path.join(synthetic, shard), "rb") as a, open(os.path.join(mixed, shard), "rb") as b:
                        assert a.read() == b.read()
                builder.check_task_split(mixed, manifest, task, split)
    assert {src["id"] for src in manifest["sources"]} == {e["id"] for e in train if e["id"].startswith("fsdd-")}
    assert all(src["copies"] == 1 for src in manifest["sources"])
    assert all(src["repo"] == FSDD_REPO and src["licence"] == "CC-BY-SA-4.0" for src in manifest["sources"])

    # More than the recorded corpus holds: each is used, then repeated under an id of its own.
    many = recorded.mix_corpora(synthetic, [rec], str(tmp_path / "many"), share=0.5)
    ids = [e["id"] for e in _all_examples(str(tmp_path / "many"), many).values()
           if e["split"] == "train" and e["id"].startswith("fsdd-")]
    assert len(ids) == len(set(ids)) == s and any("~r1" in i for i in ids)
    assert many["mixed"]["recorded"][0]["distinct_used"] == rec_train

    # The SeqIO task reads the mixed corpus as any corpus.
    from slm_jax.tasks import corpus_tasks

    source = corpus_tasks.CorpusSource(mixed, "asr_en")
    assert source.num_input_examples("train") == s + r
    assert sum(1 for _ in source.get_dataset("train", shuffle=False)) == s + r

    with pytest.raises(DataError, match="already exists"):
        recorded.mix_corpora(synthetic, [rec], mixed, share=0.1)
    with pytest.raises(DataError, match="share"):
        recorded.mix_corpora(synthetic, [rec], str(tmp_path / "bad"), share=1.0)
    with pytest.raises(DataError, match="not an imported recording corpus"):
        recorded.mix_corpora(synthetic, [synthetic], str(tmp_path / "bad"), share=0.2)
