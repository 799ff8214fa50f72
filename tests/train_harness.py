"""Runs ``slm-train`` (same argv) with test instrumentation switched on by environment variables.

  SLM_HARNESS_RECORD=FILE            append one JSON line per train step: the step number, the
                                     exact float32 loss (float.hex) and a digest of the batch
  SLM_HARNESS_KILL_BEFORE_COMMIT=N   SIGKILL this process after checkpoint N is fully written but
                                     before Orbax commits it (renames its temporary directory):
                                     the worst moment for a crash
  SLM_HARNESS_STEP_SECONDS=S         sleep S seconds after each step (lets a test's signal land
                                     in the middle of a run)
  SLM_HARNESS_FREE_BYTES=N           report N bytes free on every disk (a full disk, without
                                     filling one)

Used by tests/test_preemption.py; nothing here changes what training computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time


def _install() -> None:
    import jax
    import numpy as np

    from slm_jax.training.objectives import NextToken
    from slm_jax.training.step import Trainer

    record = os.environ.get("SLM_HARNESS_RECORD")
    pause = float(os.environ.get("SLM_HARNESS_STEP_SECONDS", "0") or 0)
    original_step = Trainer.train_step

    def train_step(self, state, frozen, batch, objective=NextToken()):
        step = int(jax.device_get(state.step)) + 1
        digest = hashlib.sha256()
        for key in sorted(batch):
            digest.update(key.encode())
            digest.update(np.asarray(jax.device_get(batch[key])).tobytes())
        new_state, metrics = original_step(self, state, frozen, batch, objective)
        if record:
            loss = float(jax.device_get(metrics["loss"]))
            with open(record, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.hex(), "batch": digest.hexdigest()[:20],
                                    "pid": os.getpid()}) + "\n")
        if pause:
            time.sleep(pause)
        return new_state, metrics

    Trainer.train_step = train_step

    free = os.environ.get("SLM_HARNESS_FREE_BYTES")
    if free:
        import shutil

        from slm_jax.training import checkpointing

        real = shutil.disk_usage
        checkpointing.shutil = type("FullDisk", (), {
            "disk_usage": staticmethod(lambda path: real(path)._replace(free=int(free)))})

    kill_at = os.environ.get("SLM_HARNESS_KILL_BEFORE_COMMIT")
    if kill_at:
        from orbax.checkpoint._src.path import atomicity

        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            if self._final_path.name == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize


if __name__ == "__main__":
    _install()
    from slm_jax.cli import train

    sys.exit(train.main(sys.argv[1:]))
