"""The MFU benchmark's counting (bench/mfu.py), on tiny models: the FLOP source, the reference
lowering that neither misses nor double counts, and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import mfu
from tiny_models import FEATURE_LENGTHS, model_spec


def test_matmul_flops_are_two_n_cubed():
    peak = mfu.measured_peak_flops("float32", 96, repeats=2)
    assert peak["flops_per_call"] == 2 * 96 ** 3
    assert peak["flops_per_s"] == pytest.approx(peak["flops_per_call"] / peak["median_s"])


@pytest.mark.slow
def test_model_flops_ignore_remat_while_the_configured_step_recomputes():
    spec = model_spec("llama")
    full = dataclasses.replace(spec, llm=dataclasses.replace(spec.llm, remat_policy="full"))
    plain_result = mfu.measure(spec, 8, FEATURE_LENGTHS, repeats=1, warmup=1, peak_size=64)
    remat_result = mfu.measure(full, 8, FEATURE_LENGTHS, repeats=1, warmup=1, peak_size=64)
    # Same model: same model FLOPs; remat recomputes the LLM's forward in the backward pass.
    assert remat_result["model_flops_per_step"] == plain_result["model_flops_per_step"]
    assert plain_result["configured_step_flops"] == plain_result["model_flops_per_step"]
    assert remat_result["configured_step_flops"] > remat_result["model_flops_per_step"]
    for r in (plain_result, remat_result):
        assert 0 < r["mfu"] and r["step_s"] > 0 and len(r["losses"]) == 2  # warm-up (compiling) + timed
        assert all(loss == loss for loss in r["losses"])  # finite steps, not NaN
    assert remat_result["losses"][0] == pytest.approx(plain_result["losses"][0], rel=1e-5)


@pytest.mark.slow
def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "mfu.json"
    assert mfu.main(["--gin_file=gin/runs/tiny.gin", "--batch_size=8", "--audio_frames=64", "--repeats=1",
                     "--warmup=1", "--peak_size=64", f"--out={out}"]) == 0
    table = capsys.readouterr().out
    assert "| MFU |" in table and "model FLOPs per step" in table
    result = json.loads(out.read_text())
    assert result["batch_size"] == 8 and result["feature_lengths"]["audio_frames"] == 64


def test_command_line_needs_a_config_and_a_batch_that_splits(capsys):
    assert mfu.main(["--batch_size=2"]) == 2
    assert "--gin_file" in capsys.readouterr().err
    assert mfu.main(["--gin_file=gin/runs/tiny.gin", "--batch_size=3"]) == 2  # 8 test devices
    assert "batch size 3 must be a multiple of the 8 devices" in capsys.readouterr().err
