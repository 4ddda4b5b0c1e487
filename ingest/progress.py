"""A periodic progress line: tasks, samples/s, MB/s of input read, ETA (by input bytes).

The conversion uses `Progress` as it is; a reader's prepare pass (the EHR identifier scan,
partition, clean, MEDS) names itself with `phase` and counts its own `unit`, and `gather`
collects its Ray tasks as they finish so that the line is live.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO


class Progress:
    def __init__(self, total_bytes: int, total_tasks: int, *, every: float = 2.0,
                 stream: TextIO | None = None, enabled: bool = True, phase: str = "",
                 unit: str = "tasks"):  # fmt: skip
        self.total_bytes, self.total_tasks = max(total_bytes, 0), total_tasks
        self.every, self.stream, self.enabled = every, stream or sys.stderr, enabled
        self.phase, self.unit = phase, unit
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

    def fraction(self) -> float:
        """Share of the work done, by input bytes; a prepare phase whose bytes are unknown (0)
        goes by count. The conversion goes by bytes only: items without any show no ETA."""
        if self.total_bytes:
            return min(self.bytes_in / self.total_bytes, 1.0)
        if self.phase and self.total_tasks:
            return min(self.tasks / self.total_tasks, 1.0)
        return 0.0

    def eta(self, elapsed: float) -> str:
        frac = self.fraction()
        if frac <= 0:
            return "--:--:--"
        return time.strftime("%H:%M:%S", time.gmtime(elapsed * (1 - frac) / frac))

    def line(self) -> str:
        el = max(time.monotonic() - self.start, 1e-6)
        mb_in = f"in {self.bytes_in / el / 1e6:.1f} MB/s"
        if self.phase:
            rate = f" | {mb_in}" if self.total_bytes else ""  # no "0.0 MB/s" when unknown
            return (
                f"[ingest] {self.phase}: {self.unit} {self.tasks}/{self.total_tasks} "
                f"({self.tasks / el:.1f}/s){rate} | ETA {self.eta(el)}"
            )
        return (
            f"[ingest] tasks {self.tasks}/{self.total_tasks} | samples {self.samples} "
            f"({self.samples / el:.1f}/s) | {mb_in} | "
            f"out {self.bytes_out / el / 1e6:.1f} MB/s | ETA {self.eta(el)}"
        )

    def show(self) -> None:
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)


def gather(ray: Any, tasks: Sequence[Callable[[], Any]], progress: Progress,
           nbytes: Sequence[int] | None = None, limit: int | None = None) -> list[Any]:  # fmt: skip
    """Run `tasks` (each submits one Ray task and returns its ref) with at most `limit` in
    flight (all at once when None), and return their results in order, counting each in
    `progress` as it finishes (with `nbytes[i]` input bytes) and showing the line every
    `progress.every` seconds. `limit` is the job's `workers`: a 1-worker job uses one core in
    its prepare passes too, as in its conversion tasks."""
    out: list[Any] = [None] * len(tasks)
    index: dict[Any, int] = {}
    todo = iter(range(len(tasks)))
    cap = limit or len(tasks)

    def submit() -> None:
        i = next(todo, None)
        if i is not None:
            index[tasks[i]()] = i

    for _ in range(cap):
        submit()
    while index:
        ready, _ = ray.wait(list(index), num_returns=1, timeout=progress.every)
        for ref in ready:
            i = index.pop(ref)
            out[i] = ray.get(ref)
            progress.update(1, 0, nbytes[i] if nbytes else 0, 0)
            submit()
        if not ready:
            progress.show()
    return out
