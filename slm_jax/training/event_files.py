"""TensorBoard event files written without TensorFlow.

flax's SummaryWriter imports TensorFlow, which costs seconds at every start of ``slm-train``;
a preempted run restarts often, and the tests start many short runs. The event file format is
tensorboard's record format (length, masked CRC32C, serialized ``Event``), which the
``tensorboard`` package writes with no TensorFlow import.

In a bucket (``gs://...``) nothing can be appended to an object: the events are kept in memory
and the whole file is uploaded again at most every ``upload_every`` seconds and at ``close``
(event files are small: about 100 bytes a logged step), so TensorBoard sees a run's progress
while it trains.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from slm_jax.training import paths


class _BucketFile:
    """A file object for RecordWriter whose bytes go to a bucket object: all of them, uploaded
    again at a ``flush`` at most every ``upload_every`` seconds, and at ``close``."""

    def __init__(self, path: str, upload_every: float):
        self.path, self._every = path, upload_every
        self._data = bytearray()
        self._uploaded_at: float | None = None
        self._uploaded_size = -1
        self.closed = False

    def write(self, b) -> int:
        self._data += bytes(b)
        return len(b)

    def _upload(self) -> None:
        if len(self._data) != self._uploaded_size:
            paths.write_file(self.path, bytes(self._data))
            self._uploaded_size = len(self._data)
        self._uploaded_at = time.monotonic()

    def flush(self) -> None:
        if self._uploaded_at is None or time.monotonic() - self._uploaded_at >= self._every:
            self._upload()

    def close(self) -> None:
        if not self.closed:
            self._upload()
            self.closed = True


class EventFile:
    """One ``events.out.tfevents.*`` file in ``logdir`` taking scalar summaries."""

    def __init__(self, logdir: str, upload_every: float = 30.0):
        paths.makedirs(logdir)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = paths.join(logdir, name)
        out = _BucketFile(self.path, upload_every) if paths.is_remote(self.path) else open(self.path, "ab")
        self._writer = RecordWriter(out)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        self._writer.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file (for tests and quick looks)."""
    import struct

    out = []
    with paths.open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.append((event.step, value.tag, value.simple_value))
    return out
