"""One training run per model directory: a second slm-train on a directory another process is
training in is refused in one line naming the holder (pid@host since time), exit 2, before it
writes anything; a lock left by a dead process does not block.

The holder is a real second process (a helper that holds the lock as a training run does), so the
refusal is tested across processes without running two trainings at once.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

import reliability_support as rs
from slm_jax.training import run_lock

HOLDER = """
import sys, time
from slm_jax.training.run_lock import RunLock
with RunLock(sys.argv[1], process_index=0) as lock:
    lock.claim()
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(model_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=rs.ROOT, env=rs.subprocess_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_while_the_first_holds_the_directory(tmp_path):
    model_dir = tmp_path / "run"
    holder = _hold(model_dir)
    try:
        # In-process, as a second run would try: refused, naming the holder.
        with pytest.raises(run_lock.RunLockError) as err:
            with run_lock.RunLock(str(model_dir), process_index=0):
                pass
        message = str(err.value)
        assert f"pid {holder.pid}@" in message and " since " in message and "\n" not in message
        # Processes other than 0 never take it.
        with run_lock.RunLock(str(model_dir), process_index=1) as other:
            other.claim()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: the kernel dropped its lock.
    with run_lock.RunLock(str(model_dir), process_index=0) as lock:
        lock.claim()
        assert run_lock.read_holder(str(model_dir))["pid"] == os.getpid()


def test_a_directory_without_a_lock_file_is_claimed_at_the_first_write(tmp_path):
    """A run refused for its configuration, or one with nothing to do, must leave the directory as
    it was: the lock file is made only when the run writes anyway."""
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    before = rs.snapshot(model_dir)
    with run_lock.RunLock(str(model_dir), process_index=0):
        assert rs.snapshot(model_dir) == before
        run_lock.claim(str(model_dir))
        holder = _hold_refused(model_dir)
        assert holder.returncode != 0
    assert os.path.exists(model_dir / run_lock.LOCK_FILE)


def _hold_refused(model_dir):
    return subprocess.run([sys.executable, "-c", HOLDER, str(model_dir)], capture_output=True, text=True,
                          cwd=rs.ROOT, env=rs.subprocess_env(), timeout=120)


@pytest.mark.slow
def test_slm_train_is_refused_while_another_process_trains_in_its_model_dir(tmp_path):
    gin_file = rs.write_config(tmp_path / "run.gin", "TRAIN_STEPS = 2\n")
    model_dir = tmp_path / "run"
    holder = _hold(model_dir)
    try:
        before = rs.snapshot(model_dir)
        refused = rs.run(rs.harness_cmd(gin_file, model_dir))
        assert refused.returncode == 2, refused.stderr[-3000:]
        errors = rs.error_lines(refused.stderr)
        assert len(errors) == 1 and errors[0].startswith("slm-train: error: model directory "), errors
        assert f"in use by another training run: pid {holder.pid}@" in errors[0] and " since " in errors[0]
        assert "Traceback" not in refused.stderr
        assert rs.snapshot(model_dir) == before, "the refused run wrote into the model directory"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder is gone (killed: nothing released by hand): the same command trains.
    trained = rs.run(rs.harness_cmd(gin_file, model_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert rs.step_dirs(model_dir) == [2]
    assert run_lock.read_holder(str(model_dir))["pid"] != holder.pid
