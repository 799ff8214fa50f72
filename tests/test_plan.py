"""slm-plan: per-device memory of the paper-scale config on a v4-64-shaped and an 8-device mesh,
and the compiled step's memory analysis on a tiny model."""

import os
import re
import subprocess
import sys

import jax
import pytest

from slm_jax.parallel import planning
from slm_jax.cli import plan as plan_cli
from tiny_models import FEATURE_LENGTHS, model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _row(out: str, devices: int) -> list[float]:
    """The numbers of the table row for a mesh of ``devices`` devices (before any verdict)."""
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[1] == str(devices) and "=" in fields[0]:
            numbers = []
            for field in fields[2:]:
                try:
                    numbers.append(float(field))
                except ValueError:
                    if numbers and field != "-":
                        break
            return numbers[:3] + [numbers[-1]]
    raise AssertionError(f"no row for {devices} devices in:\n{out}")


@pytest.mark.slow
def test_paper_config_plans_on_v4_64_and_8_devices():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "slm_jax.cli.plan", "--gin_file=gin/runs/paper_usm_mt0xxl.gin", "--mesh=v4-64",
         "--mesh=8xh100", "--batch_size=32", "--no_compile", "--device_memory_gib=16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    total = int(re.search(r"frozen ([\d,]+), adapter", out).group(1).replace(",", ""))
    assert 14.5e9 < total < 15.5e9  # ~2B Conformer + ~12.9B mT0-XXL
    # The frozen weights (bfloat16) are split over the fsdp axis: 16 ways on v4-64 (data=2
    # replicates), 8 ways on 8 devices. Small vectors that do not divide stay replicated.
    frozen_32, _, _, total_32 = _row(out, 32)
    frozen_8, _, _, total_8 = _row(out, 8)
    assert frozen_32 == pytest.approx(2 * total / 16 / GIB, rel=0.02)
    assert frozen_8 == pytest.approx(2 * total / 8 / GIB, rel=0.02)
    assert total_32 < total_8
    # Without compiling, activations are not counted: the plan never says a step "fits".
    assert "DOES NOT FIT" not in out and "activations not counted" in out and "  fits" not in out


@pytest.mark.slow
def test_compiled_plan_reports_the_step_memory():
    shape = {"data": 2, "fsdp": 1, "model": 4}
    p = planning.plan(model_spec("t5"), shape, 8, FEATURE_LENGTHS)
    c = p.compiled
    assert p.devices == 8 and c["temp_bytes"] > 0
    # The step's arguments hold at least the sharded params and optimizer state of one device.
    assert c["argument_bytes"] >= p.frozen_param_bytes + p.adapter_param_bytes + p.optimizer_bytes
    assert p.total_bytes == c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    table = planning.format_plans([p], device_memory_gib=p.total_bytes / GIB / 2)
    assert "DOES NOT FIT" in table
    assert p.adapter_params > 0 and p.frozen_params > p.adapter_params


def test_cli_errors_are_one_line(capsys):
    assert plan_cli.main(["--mesh=v4-64"]) == 2
    assert capsys.readouterr().err.strip() == "slm-plan: error: give a --gin_file"
    assert plan_cli.main(["--gin_file=paper_usm_mt0xxl.gin", f"--mesh=data=2,model={len(jax.devices()) * 8}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slm-plan: error:") and len(err.splitlines()) == 1
