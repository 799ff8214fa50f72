"""Every run config under gin/runs/ and gin/cascade/ parses and trains: each with
gin/hardware/tiny_shapes.gin after it (tiny dimensions, random frozen models), for 2 steps on data
in its real on-disk format, offline. The paper configs read fake LibriSpeech/FLEURS (TFDS) and
CoVoST 2/VoxPopuli (TSV + audio) from tests/real_corpora_fixture.py; the whisper-base/SmolLM2
configs a small generated corpus (tests/corpus_fixture.py). A paper config without its data
locations stops slm-train with one line naming the macros to set."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys

import gin
import pytest

from slm_jax.cli import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin", "runs", "*.gin"))
                     + glob.glob(os.path.join(ROOT, "gin", "cascade", "*.gin")))
PAPER = [c for c in RUN_CONFIGS if os.path.basename(c).startswith("paper_")]
CORPUS = [c for c in RUN_CONFIGS if c not in PAPER]


def _paper_bindings() -> list[str]:
    import real_corpora_fixture as fake
    from corpus_fixture import small_corpus

    spm = os.path.join(small_corpus(), "spm.model")  # a SentencePiece model as mT0's spiece.model is
    return [f"TFDS_DATA_DIR='{fake.tfds_data_dir()}'", f"COVOST2_DIR='{fake.covost2_dir()}'",
            f"VOXPOPULI_DIR='{fake.voxpopuli_dir()}'", f"LLM_VOCABULARY='spm:{spm}'"]


def _corpus_bindings(config: str) -> list[str]:
    from corpus_fixture import small_corpus

    bindings = [f"CORPUS_DIR='{small_corpus()}'"]
    if "transcriber" in config:
        bindings.append("WhisperTranscriberConfig.speeds = (1.0,)")
    return bindings


def _train(config: str, bindings: list[str], model_dir: str) -> dict:
    from slm_jax.training import loop

    gin.clear_config()
    common.parse_gin([config, "tiny_shapes.gin"], bindings)
    try:
        return loop.train(model_dir)
    finally:
        gin.clear_config()


def test_every_run_config_is_covered():
    assert len(PAPER) == 3 and len(CORPUS) >= 5, RUN_CONFIGS


@pytest.mark.parametrize("config", RUN_CONFIGS)
def test_run_config_parses_with_and_without_tiny_shapes(config):
    for files in ([config], [config, "tiny_shapes.gin"]):
        gin.clear_config()
        common.parse_gin(files, [])
        assert gin.query_parameter("train.data") is not None
        gin.query_parameter("train.model").scoped_configurable_fn()


@pytest.mark.slow
@pytest.mark.parametrize("config", PAPER)
def test_paper_config_trains_on_fake_real_corpora(config, tmp_path):
    metrics = _train(config, _paper_bindings(), str(tmp_path / "run"))
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]), metrics


@pytest.mark.slow
@pytest.mark.parametrize("config", CORPUS)
def test_corpus_config_trains_on_a_generated_corpus(config, tmp_path):
    metrics = _train(config, _corpus_bindings(config), str(tmp_path / "run"))
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]), metrics


@pytest.mark.slow
def test_paper_config_without_data_locations_names_the_macros(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "slm-train"), "--gin_file=gin/runs/paper_whisper_mt0xxl.gin",
         f"--model_dir={tmp_path / 'run'}", "--gin.TFDS_DATA_DIR='/data/tfds'"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("slm-train: error:")]
    assert len(errors) == 1, result.stderr
    for macro in ("LLM_VOCABULARY", "COVOST2_DIR", "VOXPOPULI_DIR"):
        assert f"--gin.{macro}=" in errors[0]
    assert "TFDS_DATA_DIR" not in errors[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
