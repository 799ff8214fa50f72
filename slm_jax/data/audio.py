"""The audio front end of the whole project: reading audio files and log-mel features.

Every path from a sound to the model goes through here: the corpus generator, the SeqIO
preprocessors (through the TF wrapper at the bottom), ``slm-infer`` and ``slm-mixture``. Keeping it
in one file means training and inference can never disagree about features.

Features follow Whisper's front end exactly, so a pretrained Whisper encoder sees what it was
trained on: 16 kHz audio, a periodic Hann window of 400 samples (25 ms), hop 160 (10 ms),
centred frames with reflect padding, power spectrum, 80 Slaney-scale mel filters with Slaney
area normalisation (0-8 kHz), log10 clamped at 1e-10, dynamic range limited to 8 (max - 8), then
``(x + 4) / 4``. Unlike Whisper's feature extractor we do not pad to 30 s: a clip of N samples
gives ``N // 160`` frames.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Literal

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
NUM_MEL_BINS = 80
LOG_FLOOR = 1e-10  # Whisper's clamp before log10

Normalization = Literal["whisper", "utterance", "none"]
NORMALIZATIONS = ("whisper", "utterance", "none")


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file (or example) and the problem."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Reads a wav/flac/ogg file as float32 mono in [-1, 1] at ``sample_rate``.

    Stereo is averaged to mono; other sample rates are resampled with a polyphase filter.
    Raises ``AudioError`` (naming the file) for a missing file, bytes that do not decode, a
    zero-length clip, a clip longer than ``max_seconds`` or non-finite samples.
    """
    import soundfile  # imported here: keeps `import slm_jax.data.audio` light for TF-only users

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such audio file")
    if max_seconds is not None:  # from the header, before a single sample is read (a long file would not fit)
        try:
            info = soundfile.info(path)
        except Exception as e:  # noqa: BLE001 - as below
            raise AudioError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from None
        if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise AudioError(f"{path}: audio is {info.frames / info.samplerate:.2f} s long, longer than the maximum "
                             f"of {max_seconds:g} s")
    try:
        audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from None
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    return check_audio(audio, file_rate, sample_rate, max_seconds, name=path)


def check_audio(
    audio: np.ndarray,
    file_rate: int,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    name: str = "audio",
) -> np.ndarray:
    """Validates mono samples, resamples them to ``sample_rate`` and returns float32."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono samples, got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{name}: zero-length audio (no samples)")
    if not np.all(np.isfinite(audio)):
        bad = int(np.size(audio) - np.count_nonzero(np.isfinite(audio)))
        raise AudioError(f"{name}: {bad} non-finite samples (NaN or inf)")
    seconds = audio.size / file_rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: audio is {seconds:.2f} s long, longer than the maximum of {max_seconds:g} s")
    if file_rate != sample_rate:
        audio = resample(audio, file_rate, sample_rate)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling (e.g. espeak-ng's 22.05 kHz to 16 kHz is up 320, down 441)."""
    from scipy.signal import resample_poly

    if from_rate == to_rate:
        return np.asarray(audio, np.float32)
    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(np.asarray(audio, np.float64), to_rate // g, from_rate // g).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 16-bit PCM, the corpus' storage format
# --------------------------------------------------------------------------------------------
def to_pcm16(audio: np.ndarray) -> bytes:
    """float [-1, 1] -> little-endian int16 bytes."""
    audio = np.clip(np.asarray(audio, np.float64), -1.0, 1.0)
    return np.round(audio * 32767.0).astype("<i2").tobytes()


def from_pcm16(data: bytes, name: str = "audio") -> np.ndarray:
    """Little-endian int16 bytes -> float32 in [-1, 1]."""
    if len(data) % 2:
        raise AudioError(f"{name}: {len(data)} bytes of 16-bit PCM is not a whole number of samples")
    if not data:
        raise AudioError(f"{name}: zero-length audio (no samples)")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


# --------------------------------------------------------------------------------------------
# Noise, for the synthetic corpus
# --------------------------------------------------------------------------------------------
def coloured_noise(num_samples: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-power white or pink (1/f power) noise."""
    white = rng.standard_normal(num_samples)
    if kind == "white":
        noise = white
    elif kind == "pink":
        spectrum = np.fft.rfft(white)
        freqs = np.arange(spectrum.size, dtype=np.float64)
        freqs[0] = 1.0  # leave DC alone instead of dividing by zero
        noise = np.fft.irfft(spectrum / np.sqrt(freqs), n=num_samples)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; expected 'white' or 'pink'")
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def add_noise(audio: np.ndarray, snr_db: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Adds white/pink noise at ``snr_db`` relative to the clip's mean power (inf: no noise)."""
    if math.isinf(snr_db) and snr_db > 0:
        return np.asarray(audio, np.float32)
    power = float(np.mean(np.asarray(audio, np.float64) ** 2))
    noise = coloured_noise(len(audio), kind, rng) * math.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Speed, room and channel, for the synthetic corpus
# --------------------------------------------------------------------------------------------
# Why: a synthesiser's voices are few and clean, so an adapter trained on them learns their sound.
# These change what a recording changes: the talker's tempo and vocal-tract scale (speed), the
# room (reverberation) and the microphone/codec (band limit).
def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Plays ``audio`` ``factor`` times faster, tempo and pitch together (tape speed, as in
    Kaldi's speed perturbation); ``factor`` is rounded to hundredths."""
    percent = int(round(factor * 100))
    if percent <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    # Read the clip as if it were sampled at ``percent`` and resample it to 100: len * 100 / percent samples.
    return resample(audio, percent, 100)


def room_impulse_response(rt60_s: float, direct_to_reverberant_db: float, rate: int,
                          rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: a unit direct path, then 3 ms later a noise tail whose energy falls 60 dB in
    ``rt60_s`` seconds, scaled so the direct-to-reverberant energy ratio is ``direct_to_reverberant_db``."""
    if rt60_s <= 0:
        raise ValueError(f"rt60_s must be positive, got {rt60_s}")
    length = max(int(min(1.5 * rt60_s, 1.2) * rate), 2)
    t = np.arange(length) / rate
    rir = rng.standard_normal(length) * np.exp(-3.0 * math.log(10.0) * t / rt60_s)  # -60 dB energy at rt60
    rir[: max(1, int(0.003 * rate))] = 0.0
    rir *= math.sqrt(10 ** (-direct_to_reverberant_db / 10) / max(float(np.sum(rir**2)), 1e-12))
    rir[0] = 1.0
    return rir


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``audio`` played in the room ``rir``: same length and mean power as the dry clip."""
    from scipy.signal import fftconvolve

    dry = np.asarray(audio, np.float64)
    wet = fftconvolve(dry, rir)[: dry.size]
    wet *= math.sqrt(float(np.mean(dry**2)) / max(float(np.mean(wet**2)), 1e-20))
    return wet.astype(np.float32)


def band_limit(audio: np.ndarray, low_hz: float, high_hz: float, rate: int) -> np.ndarray:
    """A 4th-order Butterworth band-pass from ``low_hz`` to ``high_hz`` (a phone or a cheap microphone)."""
    from scipy.signal import butter, sosfilt

    if not 0 < low_hz < high_hz < rate / 2:
        raise ValueError(f"band {low_hz}..{high_hz} Hz must lie inside (0, {rate / 2}) Hz")
    sos = butter(4, [low_hz, high_hz], btype="bandpass", fs=rate, output="sos")
    return sosfilt(sos, np.asarray(audio, np.float64)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Log-mel features
# --------------------------------------------------------------------------------------------
def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above.
    hz = np.asarray(hz, np.float64)
    mel = hz / (200.0 / 3)
    log_region = hz >= 1000.0
    logstep = math.log(6.4) / 27.0
    mel = np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / logstep, mel)
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(logstep * (mel - 15.0)), mel * (200.0 / 3))


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, num_mel_bins: int = NUM_MEL_BINS,
    f_min: float = 0.0, f_max: float | None = None,
) -> np.ndarray:
    """[n_fft // 2 + 1, num_mel_bins] triangular filters, Slaney scale, Slaney area norm."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), num_mel_bins + 2)
    hz_points = _mel_to_hz_slaney(mel_points)
    widths = np.diff(hz_points)
    slopes = hz_points[:, None] - fft_freqs[None, :]  # [num_mel_bins + 2, freqs]
    rising = -slopes[:-2] / widths[:-1, None]
    falling = slopes[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    # Area normalisation: every filter has the same energy whatever its width.
    filters *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    filters = np.ascontiguousarray(filters.T)
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann window (torch.hann_window's default, what Whisper uses).
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def power_spectrogram(audio: np.ndarray, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> np.ndarray:
    """|STFT|^2 of centred frames: [len(audio) // hop_length, n_fft // 2 + 1] (float64).

    Frames are centred (reflect padding of n_fft // 2 on both sides); like Whisper, the last
    frame (which would be centred on the sample after the clip) is dropped.
    """
    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1:
        raise AudioError(f"expected mono samples, got shape {audio.shape}")
    num_frames = len(audio) // hop_length
    if num_frames == 0:
        return np.zeros((0, n_fft // 2 + 1))
    pad = n_fft // 2
    mode = "reflect" if len(audio) > pad else "constant"  # reflect needs more samples than pad
    padded = np.pad(audio, pad, mode=mode)
    starts = np.arange(num_frames) * hop_length
    frames = padded[starts[:, None] + np.arange(n_fft)[None, :]]
    spectrum = np.fft.rfft(frames * _hann(n_fft)[None, :], axis=1)
    return spectrum.real**2 + spectrum.imag**2


def log_mel_spectrogram(
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    normalization: Normalization = "whisper",
) -> np.ndarray:
    """[len(audio) // hop_length, num_mel_bins] float32 log-mel features.

    normalization:
      'whisper'   : Whisper's: log10, floor at (max - 8), then (x + 4) / 4.
      'utterance' : log10, then zero mean / unit variance per mel bin over this clip's frames.
      'none'      : log10 of the clamped mel power only.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    power = power_spectrogram(audio, n_fft, hop_length)
    mel = power @ mel_filterbank(sample_rate, n_fft, num_mel_bins)
    log_mel = np.log10(np.maximum(mel, LOG_FLOOR))
    if log_mel.shape[0] == 0:
        return log_mel.astype(np.float32)
    if normalization == "whisper":
        log_mel = (np.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0
    elif normalization == "utterance":
        log_mel = (log_mel - log_mel.mean(axis=0)) / np.sqrt(log_mel.var(axis=0) + 1e-5)
    return log_mel.astype(np.float32)


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames that ``log_mel_spectrogram`` gives for a clip of ``num_samples``."""
    return num_samples // hop_length


# --------------------------------------------------------------------------------------------
# TensorFlow wrapper (SeqIO preprocessors)
# --------------------------------------------------------------------------------------------
def tf_log_mel_spectrogram(
    audio,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    normalization: Normalization = "whisper",
):
    """``log_mel_spectrogram`` for a 1-D float32 ``tf.Tensor`` inside a tf.data pipeline.

    A ``tf.numpy_function`` around the numpy code, so both paths give identical numbers.
    """
    import tensorflow as tf

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def compute(samples: np.ndarray) -> np.ndarray:
        return log_mel_spectrogram(samples, sample_rate, num_mel_bins, normalization=normalization)

    features = tf.numpy_function(compute, [tf.cast(audio, tf.float32)], tf.float32, stateful=False)
    features.set_shape([None, num_mel_bins])
    return features
