"""Shared by the reliability tests: a very small training config, subprocess runners, and
snapshots of a directory tree (to prove that a refused command left every file untouched)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "train_harness.py")

# Smaller than gin/models/model_tiny.gin: a run compiles in seconds on one CPU core.
TINY_CONFIG = """
include 'base.gin'
include 'model_tiny.gin'
include 'synthetic_data.gin'
ConformerConfig.d_model = 32
ConformerConfig.num_layers = 1
ConformerConfig.ffn_dim = 64
ConformerConfig.conv_kernel_size = 5
T5Config.d_model = 32
T5Config.d_kv = 8
T5Config.d_ff = 64
T5Config.num_layers = 1
T5Config.num_decoder_layers = 1
T5Config.relative_attention_num_buckets = 8
T5Config.relative_attention_max_distance = 16
AdapterConfig.d_model = 32
AdapterConfig.ffn_dim = 64
AdapterConfig.num_layers = 1
VOCAB_SIZE = 128
AUDIO_FRAMES = 32
TARGET_TOKENS = 6
BATCH_SIZE = 2
LEARNING_RATE = 3e-3
WARMUP_STEPS = 2
LOG_EVERY = 1
EVAL_EVERY = 0
"""


# XLA's persistent compilation cache, shared by every test subprocess: the tiny model's compiles
# are most of a run's time (30 s cold, 9 s warm on 2 busy cores), and a cached executable is the
# same program, so results are unchanged.
XLA_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "slm-jax-test-xla-cache")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    # The slm_jax of this tree, also where another copy is installed (editable or not).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def write_config(path, extra: str = "") -> str:
    path = os.fspath(path)
    with open(path, "w") as f:
        f.write(TINY_CONFIG + extra)
    return path


def harness_cmd(gin_file: str, model_dir, *extra: str) -> list[str]:
    return [sys.executable, HARNESS, f"--gin_file={gin_file}", f"--model_dir={os.fspath(model_dir)}", *extra]


def run(cmd, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(**env), timeout=timeout)


def start(cmd, **env: str) -> subprocess.Popen:
    """Like ``run`` but returns at once (the test signals the process while it trains)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=subprocess_env(**env))


def wait_for_step(proc: subprocess.Popen, record, step: int, timeout: float = 300) -> None:
    """Blocks until ``proc`` has recorded training step ``step`` (fails if it exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step and r["pid"] == proc.pid for r in read_record(record)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def read_record(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_dirs(model_dir) -> list[int]:
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def snapshot(*roots) -> dict[str, tuple]:
    """{path: (kind, size, mtime_ns, sha256)} for every file and directory under ``roots``."""
    out: dict[str, tuple] = {}
    for root in roots:
        root = os.fspath(root)
        if not os.path.exists(root):
            out[root] = ("missing",)
            continue
        if os.path.isfile(root):
            out[root] = _file_entry(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            st = os.stat(dirpath)
            out[dirpath] = ("dir", tuple(sorted(dirnames + filenames)), st.st_mtime_ns)
            for name in filenames:
                p = os.path.join(dirpath, name)
                out[p] = _file_entry(p)
    return out


def _file_entry(path: str) -> tuple:
    st = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return ("file", st.st_size, st.st_mtime_ns, digest)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# --------------------------------------------------------------------------------------------
# A synthetic data source that slm-infer can use (it needs a vocabulary and a prompt format).
# Gin files name it after `import reliability_support` (tests/ is on sys.path of the harness
# and of tests/bad_input_runner.py).
# --------------------------------------------------------------------------------------------
class ByteVocabulary:
    """UTF-8 bytes shifted by 3 (pad 0, EOS 1, unk 2): no files, no TensorFlow."""

    eos_id = 1
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def _prompted_synthetic_data():
    import gin

    from slm_jax.data.prompting import PromptFormat
    from slm_jax.data.synthetic import SyntheticData

    class PromptedSyntheticData(SyntheticData):
        vocabulary = ByteVocabulary()
        prompt_format = PromptFormat()
        max_audio_seconds = 30.0

    return gin.external_configurable(PromptedSyntheticData, module="reliability_support")


PromptedSyntheticData = _prompted_synthetic_data()

INFER_CONFIG = """
import reliability_support
train.data = @PromptedSyntheticData()
PromptedSyntheticData.feature_lengths = {'audio_frames': %AUDIO_FRAMES, 'prefix': 8, 'suffix': 8, 'targets': %TARGET_TOKENS}
PromptedSyntheticData.vocab_size = %VOCAB_SIZE
VOCAB_SIZE = 264
"""
