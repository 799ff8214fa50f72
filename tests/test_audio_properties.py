"""Properties of the audio front end (slm_jax/data/audio.py) over generated inputs (hypothesis)."""

import math

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slm_jax.data import audio

RATES = [8000, 11025, 16000, 22050, 44100, 48000]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

finite_samples = arrays(np.float32, st.integers(1, 4000), elements=st.floats(-1, 1, width=32))


@FAST
@given(samples=finite_samples, rate=st.sampled_from(RATES))
def test_check_audio_returns_bounded_float32_at_16k_with_the_right_length(samples, rate):
    out = audio.check_audio(samples, rate)
    assert out.dtype == np.float32 and out.ndim == 1
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1.0)
    assert out.size == math.ceil(samples.size * audio.SAMPLE_RATE / rate)


@FAST
@given(samples=finite_samples, bad=st.sampled_from([np.nan, np.inf, -np.inf]), data=st.data())
def test_non_finite_samples_are_refused_naming_the_count(samples, bad, data):
    positions = data.draw(st.lists(st.integers(0, samples.size - 1), min_size=1, unique=True))
    samples = samples.copy()
    samples[positions] = bad
    with pytest.raises(audio.AudioError, match=f"clip.wav: {len(positions)} non-finite samples"):
        audio.check_audio(samples, 16000, name="clip.wav")


@FAST
@given(seconds=st.floats(0.01, 5.0), limit=st.floats(0.01, 5.0), rate=st.sampled_from(RATES))
def test_maximum_length_is_enforced_exactly(seconds, limit, rate):
    samples = np.zeros(max(1, int(seconds * rate)), np.float32)
    if samples.size / rate > limit:
        with pytest.raises(audio.AudioError, match="longer than the maximum"):
            audio.check_audio(samples, rate, max_seconds=limit)
    else:
        assert audio.check_audio(samples, rate, max_seconds=limit).size > 0


@FAST
@given(samples=arrays(np.float32, st.integers(0, 6000), elements=st.floats(-1, 1, width=32)),
       normalization=st.sampled_from(audio.NORMALIZATIONS))
def test_log_mel_shape_dtype_and_finiteness(samples, normalization):
    features = audio.log_mel_spectrogram(samples, normalization=normalization)
    assert features.shape == (audio.num_frames(samples.size), audio.NUM_MEL_BINS)
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    if normalization == "whisper" and features.size:
        # Whisper's dynamic range: at most 8 decades below the loudest bin, i.e. 2 after (x+4)/4.
        assert features.max() - features.min() <= 2.0 + 1e-5


@FAST
@given(samples=arrays(np.float32, st.integers(400, 3000), elements=st.floats(-0.5, 0.5, width=32)),
       gain=st.floats(0.1, 1.9))
def test_whisper_features_of_a_louder_clip_shift_by_the_gain_in_decades(samples, gain):
    # Power scales by gain^2, so log10 mel shifts by 2*log10(gain) wherever the floor is not hit.
    base = audio.log_mel_spectrogram(samples, normalization="none")
    louder = audio.log_mel_spectrogram(samples * np.float32(gain), normalization="none")
    above_floor = (base > math.log10(audio.LOG_FLOOR) + 2) & (louder > math.log10(audio.LOG_FLOOR) + 2)
    np.testing.assert_allclose(louder[above_floor] - base[above_floor], 2 * math.log10(gain), atol=1e-3)


@FAST
@given(pcm=arrays(np.int16, st.integers(1, 2000)))
def test_pcm16_round_trip(pcm):
    restored = audio.to_pcm16(audio.from_pcm16(pcm.astype("<i2").tobytes()))
    # from_pcm16 divides by 32768 and to_pcm16 multiplies by 32767: off by at most one step.
    assert np.max(np.abs(np.frombuffer(restored, "<i2").astype(int) - pcm.astype(int))) <= 1


@FAST
@given(data=st.binary(min_size=0, max_size=64).filter(lambda b: len(b) % 2 == 1 or not b))
def test_odd_or_empty_pcm_is_refused(data):
    with pytest.raises(audio.AudioError):
        audio.from_pcm16(data)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from(RATES), channels=st.integers(1, 2), seconds=st.floats(0.05, 0.5))
def test_load_audio_resamples_any_rate_and_mixes_channels_down(tmp_path, rate, channels, seconds):
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    path = tmp_path / f"tone_{rate}_{channels}.wav"
    soundfile.write(path, np.stack([tone] * channels, axis=1), rate, subtype="PCM_16")
    out = audio.load_audio(path)
    assert out.size == math.ceil(tone.size * audio.SAMPLE_RATE / rate)
    # A 440 Hz tone stays a 440 Hz tone at 16 kHz (peak of the spectrum within one FFT bin).
    if out.size >= 800:
        spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
        peak_hz = np.argmax(spectrum) * audio.SAMPLE_RATE / out.size
        assert abs(peak_hz - 440.0) <= audio.SAMPLE_RATE / out.size + 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=0, max_size=512))
def test_load_audio_refuses_arbitrary_bytes_with_an_audio_error(tmp_path, junk):
    path = tmp_path / "junk.wav"
    path.write_bytes(junk)
    with pytest.raises(audio.AudioError, match="junk.wav"):
        audio.load_audio(path)
