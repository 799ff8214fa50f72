"""Kill-and-resume: a run cut off by SIGKILL (even mid-commit) or stopped by SIGTERM, then
resumed with the same command, computes exactly the per-step losses of an uninterrupted run.

Each run is a real ``slm-train`` process (through tests/train_harness.py, which records every
step's loss as float.hex and a digest of its batch, and can SIGKILL itself between writing a
checkpoint and Orbax committing it).
"""

import os
import signal

import pytest

import reliability_support as rs

pytestmark = pytest.mark.slow  # a module-scoped fixture or every test here takes seconds


STEPS = 6
CONFIG = f"TRAIN_STEPS = {STEPS}\nCHECKPOINT_EVERY = 2\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: {step: record line}."""
    tmp = tmp_path_factory.mktemp("reference")
    gin_file = rs.write_config(tmp / "run.gin", CONFIG)
    record = tmp / "record.jsonl"
    result = rs.run(rs.harness_cmd(gin_file, tmp / "run"), SLM_HARNESS_RECORD=str(record))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = rs.read_record(record)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in lines}) == STEPS, "losses must differ step to step for the test to mean anything"
    return {r["step"]: r for r in lines}


def _runs(record) -> list[list[dict]]:
    """The record split into one list per process, in order."""
    runs: list[list[dict]] = []
    for r in rs.read_record(record):
        if not runs or runs[-1][-1]["pid"] != r["pid"]:
            runs.append([])
        runs[-1].append(r)
    return runs


def _assert_same_as_reference(run: list[dict], reference: dict) -> None:
    for r in run:
        ref = reference[r["step"]]
        assert (r["batch"], r["loss"]) == (ref["batch"], ref["loss"]), f"step {r['step']} differs: {r} vs {ref}"


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_losses(tmp_path, reference):
    gin_file = rs.write_config(tmp_path / "run.gin", CONFIG)
    model_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    cmd = rs.harness_cmd(gin_file, model_dir)

    # 1. SIGKILL after checkpoint 4's files are written, before Orbax commits (renames) them.
    crashed = rs.run(cmd, SLM_HARNESS_RECORD=str(record), SLM_HARNESS_KILL_BEFORE_COMMIT="4")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert rs.step_dirs(model_dir) == [2], "the uncommitted step 4 must not look like a checkpoint"
    assert any(name.startswith("4.") for name in os.listdir(model_dir)), "step 4's files were written"

    # 2. The same command resumes from step 2, not the half-written 4. SIGKILL from outside at
    #    an arbitrary moment: during step 5 (after checkpoint 4).
    proc = rs.start(cmd, SLM_HARNESS_RECORD=str(record), SLM_HARNESS_STEP_SECONDS="1")
    rs.wait_for_step(proc, record, 5)
    proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert "from step 2 (2 batches consumed)" in output, output[-3000:]
    assert rs.step_dirs(model_dir) == [2, 4]
    assert not [n for n in os.listdir(model_dir) if "tmp" in n], "the cut-off save's directory is cleaned up"

    # 3. Resumes from 4; SIGTERM (preemption) after step 5 makes it save step 5 and exit 0.
    proc = rs.start(cmd, SLM_HARNESS_RECORD=str(record), SLM_HARNESS_STEP_SECONDS="1")
    rs.wait_for_step(proc, record, 5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "from step 4 (4 batches consumed)" in output
    assert "SIGTERM: saved checkpoint at step 5" in output and "Traceback" not in output
    assert "stopped at step 5 by SIGTERM; checkpoint saved" in output and "finished at step" not in output
    assert rs.step_dirs(model_dir) == [2, 4, 5]

    # 4. And once more, to the end.
    finished = rs.run(cmd, SLM_HARNESS_RECORD=str(record))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "from step 5 (5 batches consumed)" in finished.stderr
    assert rs.step_dirs(model_dir)[-1] == STEPS

    runs = _runs(record)
    assert [[r["step"] for r in run] for run in runs] == [[1, 2, 3, 4], [3, 4, 5], [5], [6]]
    for run in runs:
        _assert_same_as_reference(run, reference)

    # 5. A finished run is not trained again, and its directory stays as it is.
    before = rs.snapshot(model_dir)
    again = rs.run(cmd, SLM_HARNESS_RECORD=str(record))
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-3000:]
    assert rs.snapshot(model_dir) == before
    assert len(_runs(record)) == 4
