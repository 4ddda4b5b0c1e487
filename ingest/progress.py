"""A periodic progress line: tasks, samples/s, MB/s of input read, ETA (by input bytes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_bytes: int, total_tasks: int, *, every: float = 2.0,
                 stream: TextIO | None = None, enabled: bool = True):  # fmt: skip
        self.total_bytes, self.total_tasks = max(total_bytes, 1), total_tasks
        self.every, self.stream, self.enabled = every, stream or sys.stderr, enabled
        self.start = self.last = time.monotonic()
        self.tasks = self.samples = self.bytes_in = self.bytes_out = 0

    def update(self, tasks: int, samples: int, bytes_in: int, bytes_out: int) -> None:
        self.tasks += tasks
        self.samples += samples
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        now = time.monotonic()
        if now - self.last >= self.every or self.tasks == self.total_tasks:
            self.last = now
            self.show()

    def line(self) -> str:
        el = max(time.monotonic() - self.start, 1e-6)
        frac = min(self.bytes_in / self.total_bytes, 1.0)
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        return (
            f"[ingest] tasks {self.tasks}/{self.total_tasks} | samples {self.samples} "
            f"({self.samples / el:.1f}/s) | in {self.bytes_in / el / 1e6:.1f} MB/s | "
            f"out {self.bytes_out / el / 1e6:.1f} MB/s | ETA {eta_s}"
        )

    def show(self) -> None:
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)
