"""The command-line error layer's pieces, in process: audio length from the header before any
sample is read, the warning for a WAV cut short, gin's suffix stripped from one-line errors,
native start-up chatter dropped (and nothing else), outputs checked before the work."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import reliability_support as rs
from slm_jax.cli import common
from slm_jax.data.audio import AudioError


def _wav(path, seconds, rate=16000):
    soundfile.write(str(path), np.zeros(int(seconds * rate)), rate, subtype="PCM_16")
    return str(path)


def test_long_audio_is_refused_from_its_header_before_any_sample_is_read(tmp_path, monkeypatch):
    path = _wav(tmp_path / "long.wav", 40)

    def no_reading(*args, **kwargs):
        raise AssertionError("samples were read")

    monkeypatch.setattr(soundfile, "read", no_reading)
    with pytest.raises(AudioError) as err:
        common.check_audio_file(path, 30.0, "the data source's max_audio_seconds")
    assert str(err.value).startswith(f"{path}: audio is 40.00 s long, longer than the maximum of 30 s")


def test_the_maximum_comes_from_the_model():
    from slm_jax.models.encoders.whisper import WhisperEncoderConfig

    class Spec:
        speech_encoder = WhisperEncoderConfig()

    class Data:
        feature_lengths = {"audio_frames": 448}

    assert common.max_audio_seconds(Spec(), Data())[0] == 30.0  # 1500 positions = 3000 frames

    class Conformer:
        speech_encoder = object()

    assert common.max_audio_seconds(Conformer(), Data())[0] == pytest.approx(4.48)  # what it was trained on


def test_a_wav_whose_header_claims_more_than_it_holds_gets_one_warning(tmp_path, capsys):
    whole = (tmp_path / "ok.wav")
    _wav(whole, 0.5)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:4044])  # header + 2000 samples of 8000
    common.check_audio_file(str(cut), 30.0, prog="slm-infer")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"slm-infer: warning: {cut}: its header claims 8000 samples"), err
    common.check_audio_file(str(whole), 30.0, prog="slm-infer")
    assert capsys.readouterr().err == ""


def test_gins_suffix_is_not_part_of_the_one_line_error():
    error = ValueError("train.steps must be at least 1, got 0\n  In call to configurable 'train' "
                       "(<function train at 0x7f0bf904a5c0>)")
    assert common.one_line(error) == "train.steps must be at least 1, got 0"


def test_native_start_up_chatter_is_dropped_and_everything_else_kept():
    code = r"""
import os, sys
from slm_jax.cli import common
with common.quiet_native_stderr():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1796706893.899619   12562 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"E0000 00:00:1796706893.899619   12562 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN\n")
    os.write(2, b"E0000 00:00:1796706893.899619   12562 other.cc:12] a real error\n")
    print("a python warning", file=sys.stderr)
"""
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=rs.ROOT,
                           env=rs.subprocess_env())
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == ["E0000 00:00:1796706893.899619   12562 other.cc:12] a real error",
                                         "a python warning"]
    verbose = subprocess.run([sys.executable, "-c", code.replace("from slm_jax.cli import common",
                                                                 "from slm_jax.cli import common\ncommon.set_verbose(True)")],
                             capture_output=True, text=True, cwd=rs.ROOT, env=rs.subprocess_env())
    assert len(verbose.stderr.splitlines()) == 5


def test_an_output_on_a_full_disk_is_refused_before_the_work_and_leaves_nothing(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        with open(mount / "filler", "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        before = sorted(os.listdir(mount))
        with pytest.raises(common.UserError, match="cannot write --out .*report.json: No space left"):
            common.check_output_file("--out", str(mount / "report.json"))
        with pytest.raises(OSError):
            common.write_text_atomically(str(mount / "report.json"), "x" * (1 << 20))
        assert sorted(os.listdir(mount)) == before  # no probe, no .tmp
    finally:
        subprocess.run(["umount", str(mount)])


def test_an_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(common.UserError, match="is a directory"):
        common.check_output_path("--out", str(tmp_path))


def test_load_audio_refuses_a_long_file_from_its_header_before_reading_samples(tmp_path, monkeypatch):
    """The library's own reader checks the length first too (not only the command-line tools)."""
    import numpy as np
    import soundfile

    from slm_jax.data import audio

    path = tmp_path / "long.wav"
    soundfile.write(path, np.zeros(16000 * 12, np.float32), 16000)
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: (_ for _ in ()).throw(AssertionError("samples read")))
    with pytest.raises(audio.AudioError, match=r"12\.00 s long, longer than the maximum of 10 s"):
        audio.load_audio(path, max_seconds=10)
