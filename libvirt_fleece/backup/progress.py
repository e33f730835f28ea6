# SPDX-License-Identifier: LGPL-2.1-or-later
"""Progress of a backup: a thread-safe byte counter and two ways to show it.

The library calls ``progress(event)`` with a :class:`ProgressEvent`; the CLI
passes :class:`Bar` on a terminal (one redrawn line with bytes, rate and
ETA) and :class:`LogLines` otherwise (a plain line every few seconds).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from ..units import human_size


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    kind: str               # "start" | "copy" | "done" | "message"
    done: int = 0           # bytes copied so far (all disks)
    total: int = 0          # bytes to copy (all disks)
    elapsed: float = 0.0
    text: str = ""

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> Optional[float]:
        rate = self.rate
        if rate <= 0 or self.total <= self.done:
            return None if self.total > self.done else 0.0
        return (self.total - self.done) / rate


ProgressCallback = Callable[[ProgressEvent], None]


class Counter:
    """Bytes copied by several threads, reported at most ``interval`` seconds apart."""

    def __init__(self, callback: Optional[ProgressCallback], total: int,
                 interval: float = 0.2) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self.interval = interval
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._emit("start")

    def _emit(self, kind: str) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(kind, self.done, self.total,
                                        time.monotonic() - self.start))

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
            self._emit("copy")

    def finish(self) -> None:
        with self._lock:
            self._emit("done")


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


def describe(ev: ProgressEvent) -> str:
    pct = 100.0 * ev.done / ev.total if ev.total else 100.0
    return (f"{pct:5.1f}%  {human_size(ev.done, fixed=True)} / "
            f"{human_size(ev.total, fixed=True)}  {human_size(ev.rate, fixed=True)}/s  "
            f"ETA {_duration(ev.eta)}")


class Bar:
    """A one-line bar redrawn in place (for a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.kind == "message":
            self.stream.write(f"\r\033[K{ev.text}\n")
            self.stream.flush()
            return
        frac = ev.done / ev.total if ev.total else 1.0
        filled = int(self.width * min(frac, 1.0))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r\033[K[{bar}] {describe(ev)}")
        if ev.kind == "done":
            self.stream.write("\n")
        self.stream.flush()


class LogLines:
    """Plain lines, one every ``every`` seconds (for logs and pipes)."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 5.0) -> None:
        self.stream = stream
        self.every = every
        self._last = -1e9

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.kind == "message":
            print(ev.text, file=self.stream, flush=True)
            return
        if ev.kind == "copy" and ev.elapsed - self._last < self.every:
            return
        self._last = ev.elapsed
        print(f"progress: {describe(ev)}", file=self.stream, flush=True)
