"""Progress of long steps, as data: code that moves bytes (CRC checks, hashing) or runs many inputs (verification)
reports through `track`; the CLI installs a sink that draws it on a terminal. Without a sink (the Python API,
--json, --quiet, output that is not a terminal) `track` costs one check and draws nothing."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

THRESHOLD_ENV = "LEXPORT_PROGRESS_MIN_BYTES"
DEFAULT_MIN_BYTES = 256 << 20  # under this, a byte-moving step is over before a bar would help


@dataclass
class Task:
    label: str
    total: int
    unit: str = "bytes"  # or what is counted: "inputs", "batches"
    completed: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, n: int = 1) -> None:
        with self._lock:  # CRC and hashing advance from worker threads
            self.completed += n


class Sink(Protocol):
    def begin(self, task: Task) -> None: ...

    def end(self, task: Task) -> None: ...


class _Nothing:
    def advance(self, n: int = 1) -> None:
        return None


_NOTHING = _Nothing()
_sink: Sink | None = None


def min_bytes() -> int:
    """The size from which byte-moving steps show a bar: $LEXPORT_PROGRESS_MIN_BYTES, else 256 MiB."""
    try:
        return max(0, int(os.environ.get(THRESHOLD_ENV, DEFAULT_MIN_BYTES)))
    except ValueError:
        return DEFAULT_MIN_BYTES


@contextlib.contextmanager
def showing(sink: Sink | None) -> Iterator[None]:
    """Route `track` to `sink` (process-wide: hashing runs in a background thread) while the block runs."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous


@contextlib.contextmanager
def track(label: str, total: int, unit: str = "bytes") -> Iterator[Task | _Nothing]:
    """A task of `total` units; `advance(n)` as they are done. Shown only when a sink is installed and, for bytes,
    from min_bytes() on."""
    sink = _sink
    if sink is None or total <= 0 or (unit == "bytes" and total < min_bytes()):
        yield _NOTHING
        return
    task = Task(label, total, unit)
    sink.begin(task)
    try:
        yield task
    finally:
        sink.end(task)


def rate_and_eta(task: Task, now: float | None = None) -> tuple[float, float | None]:
    """(units per second, seconds left or None while unknown)."""
    elapsed = max((now or time.monotonic()) - task.started, 1e-9)
    rate = task.completed / elapsed
    left = (task.total - task.completed) / rate if rate > 0 else None
    return rate, left

