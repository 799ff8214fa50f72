"""slm-train end to end: trains, checkpoints, resumes, and refuses bad input with one clear line."""

import contextlib
import os
import subprocess
import sys

import pytest

import reliability_support as rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "slm_jax.cli.train"]

CONFIG = """
include 'base.gin'
include 'model_tiny.gin'
include 'synthetic_data.gin'
CHECKPOINT_EVERY = 3
EVAL_EVERY = 3
LOG_EVERY = 1
AUDIO_FRAMES = 64
TARGET_TOKENS = 8
LEARNING_RATE = 3e-3
WARMUP_STEPS = 2
"""


def _train(tmp_path, model_dir, *extra):
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(CONFIG)
    # One CPU device and the shared XLA compile cache: a rerun of the same shapes compiles nothing.
    return subprocess.run(TRAIN + [f"--gin_file={gin_file}", f"--model_dir={model_dir}", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=rs.subprocess_env(), timeout=600)


def _losses(output: str) -> dict[int, float]:
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] == "step" and parts[2] == "loss":
            out[int(parts[1])] = float(parts[3])
    return out


@pytest.mark.slow
def test_train_checkpoint_resume_and_refusals(tmp_path):
    model_dir = tmp_path / "run"
    first = _train(tmp_path, model_dir, "--gin.TRAIN_STEPS=6")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = _losses(first.stdout + first.stderr)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert sorted(d for d in os.listdir(model_dir) if d.isdigit()) == ["3", "6"]
    assert os.listdir(model_dir / "train"), "TensorBoard event files"

    # The same command with more steps resumes at step 6 (no step 1..6 lines again).
    second = _train(tmp_path, model_dir, "--gin.TRAIN_STEPS=8")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and "from step 6" in second.stderr
    assert sorted(_losses(second.stdout + second.stderr)) == [7, 8]

    # A different adapter shape is refused in one line, and the checkpoints are untouched.
    before = sorted(os.listdir(model_dir))
    mtimes = {d: os.path.getmtime(model_dir / d) for d in before if d.isdigit()}
    third = _train(tmp_path, model_dir, "--gin.TRAIN_STEPS=10", "--gin.AdapterConfig.d_model=64")
    assert third.returncode == 2
    error_lines = [l for l in third.stderr.splitlines() if "error:" in l]
    assert len(error_lines) == 1 and "different configuration" in error_lines[0]
    assert "Traceback" not in third.stderr
    assert sorted(os.listdir(model_dir)) == before
    assert {d: os.path.getmtime(model_dir / d) for d in mtimes} == mtimes


def test_unknown_gin_binding_is_one_clear_line(tmp_path):
    result = _train(tmp_path, tmp_path / "x", "--gin.NoSuchThing.value=3")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad gin configuration" in result.stderr and "NoSuchThing" in result.stderr
    assert not (tmp_path / "x").exists()


# --- model directory problems: refused before any training (no step runs, nothing written) ----
@contextlib.contextmanager
def _mounted_tmpfs(path, options):
    """A real small or read-only filesystem (needs root and mount); skips the test otherwise."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                            capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _refused_before_training(tmp_path, model_dir, expected, **env):
    gin_file = rs.write_config(tmp_path / "run.gin", "TRAIN_STEPS = 2\n")
    record = tmp_path / "record.jsonl"
    result = rs.run(rs.harness_cmd(gin_file, model_dir), SLM_HARNESS_RECORD=str(record), **env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = rs.error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("slm-train: error: model directory") and expected in errors[0]
    assert rs.read_record(record) == [], "no step may run"


@pytest.mark.slow
def test_read_only_model_dir_is_refused_before_training(tmp_path):
    if os.geteuid() == 0:
        with _mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
            _refused_before_training(tmp_path, ro / "run", "is not writable")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        _refused_before_training(tmp_path, tmp_path / "ro" / "run", "is not writable")


@pytest.mark.slow
def test_full_disk_is_refused_before_training(tmp_path):
    # The tiny run's checkpoints need about 4.5 MiB (4 checkpoints + margin): 256 KiB is too little.
    with _mounted_tmpfs(tmp_path / "small", "size=256k") as small:
        _refused_before_training(tmp_path, small / "run", "MiB free; checkpoints need about")
        assert os.listdir(small / "run") == [], "the write probe is removed"


@pytest.mark.slow
def test_too_little_free_space_is_refused_before_training(tmp_path):
    """The same check without root: the harness reports 1 MiB free on every disk."""
    _refused_before_training(tmp_path, tmp_path / "run", "1.0 MiB free", SLM_HARNESS_FREE_BYTES=str(2**20))
