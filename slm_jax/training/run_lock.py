"""One training run per model directory: an advisory lock held by process 0 for the whole run.

Two ``slm-train`` runs writing into one model directory would interleave checkpoints, overwrite
each other's config.gin and resume from each other's steps. The first run holds ``.run.lock`` in
the model directory (``fcntl.flock``); a second one is refused with the holder's pid, host and
start time before it writes anything. The kernel drops the lock when the holder exits, however
it exits (SIGKILL included), so a lock left by a dead process never blocks.

The lock file is created, and the holder written into it, only once the run is about to write
into the model directory anyway (``claim``, called by ``checkpointing.ensure_writable``): a run
refused for its configuration, or one with nothing left to do, leaves the directory byte for
byte as it was. The file stays after the run (removing it would let a third run lock a new file
while the second still waits on the old one); its contents only mean something while it is
locked.

Local file systems only: on a network file system ``flock`` may be emulated or missing, and the
lock is then skipped with a warning (jobs on shared storage need their scheduler's exclusion).
A model directory in a bucket (``gs://...``) has no lock at all: an object store has no
``flock``, and nothing there is dropped when a writer dies. Such a run says in the log that the
one-writer lock is not available and goes on; keeping to one run per bucket directory is then
the launcher's job (one job name per model directory).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Any

from slm_jax.errors import UserError
from slm_jax.training import paths

LOCK_FILE = ".run.lock"

log = logging.getLogger("slm_jax.training.run_lock")

# Model directory (absolute) -> the RunLock that this process entered for it.
_ACTIVE: dict[str, "RunLock"] = {}


class RunLockError(UserError):
    """Another process is training in the same model directory."""


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it is starting up)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')}@{holder.get('host', '?')} since {when}"


def read_holder(model_dir: str) -> dict[str, Any] | None:
    """What the lock file says about its last holder (None: no file, or nothing readable)."""
    if paths.is_remote(model_dir):
        return None
    try:
        with open(os.path.join(model_dir, LOCK_FILE)) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(model_dir):`` around a training run (a no-op on processes other than 0)."""

    def __init__(self, model_dir: str, process_index: int | None = None):
        self.model_dir = paths.absolute(model_dir)
        self.path = paths.join(self.model_dir, LOCK_FILE)
        self.remote = paths.is_remote(self.model_dir)
        self._process_index = process_index
        self._fd: int | None = None
        self._claimed = False
        self._active = False

    # -- process 0 only ------------------------------------------------------------------------
    def _is_writer(self) -> bool:
        if self._process_index is None:
            import jax

            self._process_index = jax.process_index()
        return self._process_index == 0

    def _lock(self, create: bool) -> None:
        """Opens the lock file (creating it when ``create``) and takes the lock, or refuses."""
        import fcntl

        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            return  # not there yet: taken by ``claim``
        except OSError as e:
            if create:
                raise
            log.warning("cannot open %s (%s); training without the one-run-per-directory lock", self.path, e)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(
                    f"model directory {self.model_dir} is in use by another training run: "
                    f"{_describe(read_holder(self.model_dir))} (lock {self.path}); wait for it to finish or "
                    "stop it, or choose another --model_dir") from None
            log.warning("cannot lock %s (%s); training without the one-run-per-directory lock", self.path, e)
            return
        self._fd = fd

    def __enter__(self) -> "RunLock":
        if not self._is_writer():
            return self
        if self.remote:
            log.warning("model directory %s is in a bucket, which has no file locks: the one-training-run-per-"
                        "directory lock is not available there; make sure no other run writes into it",
                        self.model_dir)
            return self
        if os.path.isdir(self.model_dir):
            self._lock(create=False)  # an existing lock file: taken now, without changing anything
        _ACTIVE[self.model_dir] = self
        self._active = True
        return self

    def claim(self) -> None:
        """The run is about to write into the model directory: create the lock file if needed, take
        the lock if not yet held, and record this process as the holder."""
        if not self._active or self._claimed:
            return
        if self._fd is None:
            os.makedirs(self.model_dir, exist_ok=True)
            self._lock(create=True)
        if self._fd is None:
            return
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        data = json.dumps(holder).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        self._claimed = True

    def release(self) -> None:
        if self._active:
            _ACTIVE.pop(self.model_dir, None)
            self._active = False
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __exit__(self, *exc) -> None:
        self.release()


def claim(model_dir: str) -> None:
    """Called before the first write into ``model_dir``: the RunLock this process entered for it
    (if any) takes and records the lock. Without one (library use, tests) nothing happens."""
    lock = _ACTIVE.get(paths.absolute(model_dir))
    if lock is not None:
        lock.claim()
