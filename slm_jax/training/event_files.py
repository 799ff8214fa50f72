"""TensorBoard event files written without TensorFlow.

flax's SummaryWriter imports TensorFlow, which costs seconds at every start of ``slm-train``;
a preempted run restarts often, and the tests start many short runs. The event file format is
tensorboard's record format (length, masked CRC32C, serialized ``Event``), which the
``tensorboard`` package writes with no TensorFlow import.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class EventFile:
    """One ``events.out.tfevents.*`` file in ``logdir`` taking scalar summaries."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._writer = RecordWriter(open(self.path, "ab"))
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
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.append((event.step, value.tag, value.simple_value))
    return out
