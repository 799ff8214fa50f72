"""The generated corpus: exact translations, deterministic plans, shard checks, slm-make-corpus."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest

from corpus_fixture import small_corpus
from slm_jax.cli import make_corpus as make_corpus_cli
from slm_jax.data import corpus, grammar
from slm_jax.data.errors import CorruptShardError


# --------------------------------------------------------------------------------------------
# Translations
# --------------------------------------------------------------------------------------------
# Written by hand (not produced by the code under test).
HAND_TRANSLATIONS = [
    (grammar.Location("red", "cup", "table"),
     {"en": "The red cup is on the table.", "fr": "La tasse rouge est sur la table.",
      "de": "Die rote Tasse ist auf dem Tisch.", "es": "La taza roja está sobre la mesa."}),
    (grammar.Count(((3, "white", "box"),)),
     {"en": "I see three white boxes.", "fr": "Je vois trois boîtes blanches.",
      "de": "Ich sehe drei weiße Kisten.", "es": "Veo tres cajas blancas."}),
    (grammar.Appointment("meeting", 0, 3),
     {"en": "The meeting is on Monday at three o'clock.", "fr": "La réunion est lundi à trois heures.",
      "de": "Das Treffen ist am Montag um drei Uhr.", "es": "La reunión es el lunes a las tres."}),
    (grammar.Birthday(4),
     {"en": "My birthday is in May.", "fr": "Mon anniversaire est en mai.", "de": "Mein Geburtstag ist im Mai.",
      "es": "Mi cumpleaños es en mayo."}),
]


@pytest.mark.parametrize("meaning,expected", HAND_TRANSLATIONS)
def test_grammar_renders_hand_checked_translations(meaning, expected):
    for lang, sentence in expected.items():
        assert grammar.render(meaning, lang) == sentence


def _all_single_meanings():
    """Every meaning the AST tasks can say (the grammar's space is small enough to enumerate)."""
    g = grammar
    yield from (g.Location(c, o, p) for c, o, p in itertools.product(g.COLOURS, g.OBJECTS, g.LOCATIONS))
    yield from (g.Count(((n, c, o),)) for n, c, o in itertools.product(range(2, 13), g.COLOURS, g.OBJECTS))
    yield from (g.Appointment(e, d, h) for e, d, h in itertools.product(g.EVENTS, range(7), range(2, 13)))
    yield from (g.Birthday(m) for m in range(12))
    for n in (3, 4):
        yield from (g.Code(d) for d in itertools.product(range(10), repeat=n))
    yield from (g.Introduction(n) for n in g.COMMON_NAMES)


def test_ast_targets_are_the_translation_of_the_spoken_sentence():
    by_english: dict[str, list] = {}
    for m in _all_single_meanings():
        by_english.setdefault(grammar.render(m, "en"), []).append(m)
    specs = [s for s in corpus.plan_corpus(600, seed=5) if s.task.startswith("ast_en_")]
    assert len(specs) > 50
    for s in specs:
        lang = s.task.rsplit("_", 1)[1]
        meanings = by_english[s.text]  # KeyError: the transcript is not a sentence of the grammar
        # The English sentence is unambiguous, and the target is its rendering in the target language.
        assert len(meanings) == 1, s.text
        assert s.target == grammar.render(meanings[0], lang), (s.id, s.text, s.target)


def test_asr_targets_are_the_transcripts_and_instruction_answers_are_in_the_speech():
    for s in corpus.plan_corpus(300, seed=2):
        assert s.text.strip() and s.target.strip() and s.instruction.strip(), s.id
        if s.task.startswith("asr_") or s.task == "instruct_biasing":
            assert s.target == s.text
        if s.task == "instruct_biasing":
            spoken = [n for n in grammar.BIASING_NAMES if n in s.text]
            assert len(spoken) == 1 and spoken[0] in s.instruction
        if s.task == "instruct_qa" and s.instruction.startswith("What colour"):
            assert s.target in s.text


# --------------------------------------------------------------------------------------------
# Plans and the written corpus
# --------------------------------------------------------------------------------------------
def test_plan_is_deterministic_and_splits_never_overlap():
    a, b = corpus.plan_corpus(200, seed=1), corpus.plan_corpus(200, seed=1)
    assert a == b
    assert a != corpus.plan_corpus(200, seed=2)
    assert len({s.id for s in a}) == len(a)
    for s in a:
        if corpus.TASKS[s.task].zero_shot:
            assert s.split == "test"
        else:
            assert s.split == corpus.split_of(s.id)
    # Held-out biasing names never occur in any training example.
    for s in a:
        if s.split == "train":
            assert not any(n in s.text + s.instruction for n in grammar.UNSEEN_BIASING_NAMES)


def test_small_corpus_manifest_matches_its_shards():
    root = small_corpus()
    manifest = corpus.load_manifest(root)
    total = 0
    for task, info in manifest["tasks"].items():
        for split, s in info["splits"].items():
            counts = [corpus.check_shard(p) for p in corpus.shard_paths(root, manifest, task, split)]
            assert sum(counts) == s["examples"]
            assert counts == corpus.expected_shard_records(manifest, task, split)
            total += s["examples"]
            seconds = 0.0
            for path in corpus.shard_paths(root, manifest, task, split):
                for ex in corpus.read_examples(path):
                    assert ex["task"] == task and ex["split"] == split
                    assert ex["num_samples"] == len(ex["audio"]) > 1600  # at least 0.1 s of speech
                    seconds += len(ex["audio"]) / corpus.SAMPLE_RATE
            assert seconds == pytest.approx(s["seconds"], abs=1e-3)
    assert total == 60
    assert not [f for _, _, fs in os.walk(root) for f in fs if ".tmp" in f]  # nothing half-written left


def test_truncated_shard_is_reported_with_its_file(tmp_path):
    root = small_corpus()
    manifest = corpus.load_manifest(root)
    src = corpus.shard_paths(root, manifest, "asr_en", "train")[0]
    data = open(src, "rb").read()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptShardError, match=r"cut\.tfrecord: truncated in record"):
        corpus.check_shard(str(cut))
    # Cut exactly at a record boundary: the framing is fine, only the count reveals it.
    first_len = int.from_bytes(data[:8], "little") + 16
    boundary = tmp_path / "boundary.tfrecord"
    boundary.write_bytes(data[:first_len])
    expected = corpus.expected_shard_records(manifest, "asr_en", "train")[0]
    assert expected > 1
    with pytest.raises(CorruptShardError, match=r"boundary\.tfrecord: 1 records, the manifest says"):
        corpus.check_shard(str(boundary), expected)


# --------------------------------------------------------------------------------------------
# slm-make-corpus
# --------------------------------------------------------------------------------------------
def test_make_corpus_cli_writes_a_corpus_and_a_summary(tmp_path, capsys):
    out = tmp_path / "c"
    rc = make_corpus_cli.main([f"--out={out}", "--size=16", "--workers=1", "--synthesizer=tones",
                               "--languages=en,fr", "--vocab_size=0", "--quiet", "--snr_db=inf"])
    assert rc == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"asr_en", "asr_fr", "ast_en_fr", "instruct_qa", "instruct_biasing",
                                      "instruct_dialog", "instruct_count", "zeroshot_answer_in_french",
                                      "zeroshot_which_colour", "zeroshot_biasing_unseen"}
    assert "16 examples" in printed and "hours of audio" in printed
    for task in manifest["tasks"]:
        assert task in printed
    # Same command again: refused, one line, exit 2.
    rc = make_corpus_cli.main([f"--out={out}", "--size=16", "--synthesizer=tones", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a corpus" in err and "--overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--languages=en,xx"], "unknown --languages xx"),
    (["--size=0"], "--size must be positive"),
    (["--workers=0"], "--workers must be positive"),
])
def test_make_corpus_cli_rejects_bad_input(tmp_path, capsys, args, message):
    argv = [f"--out={tmp_path / 'c'}", "--synthesizer=tones", "--quiet", "--size=8"] + args  # a later flag wins
    assert make_corpus_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm-make-corpus: error:") and message in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_make_corpus_help_lists_the_tasks(capsys):
    with pytest.raises(SystemExit) as e:
        make_corpus_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--snr_db" in out and "ast_en_fr" in out and "instruct_biasing" in out


def test_snr_controls_the_noise_level():
    spec = corpus.plan_corpus(20, seed=0)[0]
    clean = corpus.synthesize(corpus._Job(spec, "tones", float("inf")))[1]
    noisy = corpus.synthesize(corpus._Job(spec, "tones", 10.0))[1]
    c = np.frombuffer(clean, "<i2").astype(np.float64)
    n = np.frombuffer(noisy, "<i2").astype(np.float64)
    snr = 10 * np.log10(np.mean(c**2) / np.mean((n - c) ** 2))
    assert snr == pytest.approx(10.0, abs=0.5)


# --------------------------------------------------------------------------------------------
# flite voices (--flite_share)
# --------------------------------------------------------------------------------------------
def test_flite_share_changes_only_the_voices_of_english_utterances():
    plain = corpus.plan_corpus(200, seed=4, open_asr=20)
    mixed = corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5)
    assert len(plain) == len(mixed)
    flite = 0
    for a, b in zip(plain, mixed):
        if b.voice.startswith(corpus.FLITE_PREFIX):
            flite += 1
            assert a.lang == "en" and b.voice[len(corpus.FLITE_PREFIX):] in corpus.FLITE_VOICES
            b = b.__class__(**{**b.__dict__, "voice": a.voice})
        assert a == b  # text, instruction, target, split, speed, noise: unchanged
    english = sum(s.lang == "en" for s in plain)
    assert 0.35 * english < flite < 0.65 * english
    assert corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5) == mixed  # deterministic
    assert all(not s.voice.startswith(corpus.FLITE_PREFIX) for s in corpus.plan_corpus(50, flite_share=0.0))
    assert "slt" not in corpus.FLITE_VOICES  # a real-speech evaluation speaker (release/real_speech)
    with pytest.raises(ValueError, match="flite_share"):
        corpus.plan_corpus(10, flite_share=1.5)


@pytest.mark.skipif(not corpus.flite_available(), reason="flite is not installed (apt-get install flite)")
def test_flite_speaks_at_the_corpus_rate_and_speed_stretches_it():
    spec = next(s for s in corpus.plan_corpus(40, seed=1, flite_share=1.0) if s.lang == "en")
    slow = corpus.synthesize(corpus._Job(dataclasses.replace(spec, speed=130), "espeak", float("inf")))[1]
    fast = corpus.synthesize(corpus._Job(dataclasses.replace(spec, speed=190), "espeak", float("inf")))[1]
    samples = np.frombuffer(slow, "<i2")
    assert samples.size > corpus.SAMPLE_RATE // 2 and np.abs(samples).max() > 1000  # real, audible speech
    assert len(slow) > 1.2 * len(fast)


def test_make_corpus_cli_rejects_a_bad_flite_share(tmp_path, capsys):
    assert make_corpus_cli.main([f"--out={tmp_path / 'c'}", "--size=8", "--synthesizer=tones", "--quiet",
                                 "--flite_share=2"]) == 2
    assert "--flite_share must be between 0 and 1" in capsys.readouterr().err
