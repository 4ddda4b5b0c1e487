"""A periodic progress line: tasks, samples/s, MB/s of input read, ETA (by input bytes).

The conversion uses `Progress` as it is; every other phase (discovery, the DICOM header scan,
the CT statistics pass, a reader's prepare passes) names itself with `phase` and counts its own
`unit`, and `gather` collects its Ray tasks as they finish so that the line is live.

Every line goes through `emit`: to stderr (unless quiet) and to the job's log file while
`job_log` holds one open (`<out>/_logs/ingest-<UTC time>.log`), so the log has the console's
lines. An error that ends the job leaves one line on stderr and its traceback in the log only,
with input paths replaced by their keyed tokens (`redact`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from .bookkeeping import LOG_DIR

_LOGS: list[TextIO] = []  # the open log files of the job running in this process


def emit(line: str, *, console: bool = True, stream: TextIO | None = None) -> None:
    """One line of the job: on `stream` (stderr by default) when `console`, and in the log."""
    if console:
        print(line, file=stream or sys.stderr, flush=True)
    for f in _LOGS:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
        f.flush()


class Progress:
    def __init__(self, total_bytes: int, total_tasks: int, *, every: float = 2.0,
                 stream: TextIO | None = None, enabled: bool = True, phase: str = "",
                 unit: str = "tasks"):  # fmt: skip
        self.total_bytes, self.total_tasks = max(total_bytes, 0), total_tasks
        self.every, self.stream, self.enabled = every, stream or sys.stderr, enabled
        self.phase, self.unit = phase, unit
        self.start = self.last = time.monotonic()
        self.tasks = self.samples = self.bytes_in = self.bytes_out = 0
        self.quarantined = self.duplicates = 0

    def update(self, tasks: int, samples: int, bytes_in: int, bytes_out: int, *,
               quarantined: int = 0, duplicates: int = 0) -> None:  # fmt: skip
        """Count finished work; `samples` are those kept (a duplicate is not written)."""
        self.tasks += tasks
        self.samples += samples
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.quarantined += quarantined
        self.duplicates += duplicates
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
            bad = f" | quarantined {self.quarantined}" if self.quarantined else ""
            return (
                f"[ingest] {self.phase}: {self.unit} {self.tasks}/{self.total_tasks} "
                f"({self.tasks / el:.1f}/s){bad}{rate} | ETA {self.eta(el)}"
            )
        return (
            f"[ingest] tasks {self.tasks}/{self.total_tasks} | samples {self.samples} "
            f"({self.samples / el:.1f}/s) | quarantined {self.quarantined} | "
            f"duplicates {self.duplicates} | {mb_in} | "
            f"out {self.bytes_out / el / 1e6:.1f} MB/s | ETA {self.eta(el)}"
        )

    def show(self) -> None:
        emit(self.line(), console=self.enabled, stream=self.stream)


def gather(ray: Any, tasks: Sequence[Callable[[], Any]], progress: Progress,
           nbytes: Sequence[int] | None = None, limit: int | None = None,
           units: Sequence[int] | None = None) -> list[Any]:  # fmt: skip
    """Run `tasks` (each submits one Ray task and returns its ref) with at most `limit` in
    flight (all at once when None), and return their results in order, counting each in
    `progress` as it finishes (as `units[i]` of its unit, 1 by default, with `nbytes[i]` input
    bytes) and showing the line every `progress.every` seconds. `limit` is the job's
    `workers`: a 1-worker job uses one core in its prepare passes too, as in its conversion.
    With `nbytes`, the largest go first: a phase then ends about when its biggest input does
    (MIMIC-IV's labevents is half the input), not one biggest-input time after the rest."""
    out: list[Any] = [None] * len(tasks)
    index: dict[Any, int] = {}
    order = range(len(tasks))
    todo = iter(sorted(order, key=lambda i: -nbytes[i]) if nbytes else order)
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
            progress.update(units[i] if units else 1, 0, nbytes[i] if nbytes else 0, 0)
            submit()
        if not ready:
            progress.show()
    return out


@contextmanager
def job_log(dest: str) -> Iterator[str]:
    """Write the job's lines to `<dest>/_logs/ingest-<UTC time>-<pid>.log` while open; yields
    its path. On an object store (no appends) the log is kept locally and uploaded on close."""
    from medfm.io import get_fs, is_local

    fs, root = get_fs(dest)
    name = f"{LOG_DIR}/ingest-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    local = is_local(fs)
    if local:
        fs.makedirs(f"{root}/{LOG_DIR}", exist_ok=True)
        f = open(f"{root}/{name}", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    else:
        f = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False, encoding="utf-8")  # noqa: SIM115
    _LOGS.append(f)
    try:
        yield f"{dest.rstrip('/')}/{name}"
    finally:
        _LOGS.remove(f)
        f.close()
        if not local:
            try:
                fs.put_file(f.name, f"{root}/{name}")
            finally:
                os.unlink(f.name)


def redact(text: str, spec: Any, keyring: Any | None) -> str:
    """`text` with every path under a source root shown as `<source>/<keyed token>` (the
    relative path itself only with `deid.hash_paths: false`), as quarantine records show it:
    folder and file names can be patient names, UIDs and dates."""
    from .tasks import shown_path

    def shown(src: Any, rel: str | None) -> str:
        if not rel:
            return f"<{src.name} root>"
        if keyring is None and spec.deid.hash_paths:
            return f"<{src.name}>/<path>"
        return f"<{src.name}>/{shown_path(spec, keyring, rel)}"

    for src in sorted(spec.sources, key=lambda s: -len(s.root)):  # nested roots: longest first
        root = src.root.split("://", 1)[-1].rstrip("/")  # fsspec errors drop the scheme
        if len(root) > 1:
            pattern = re.compile(re.escape(root) + r"(?:/([^\s'\"(),;]+))?(?![\w.-])")
            text = pattern.sub(lambda m, s=src: shown(s, m[1]), text)
    return text


def _root_cause(e: BaseException) -> BaseException:
    """The worker's exception behind a Ray task error, else `e`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _file_of(e: BaseException) -> str:
    """The file an error is about: an OSError's file anywhere in its chain (a rename's target
    before its source), else the path the innermost failing frame held (`path` or `p`, as
    medfm's readers and bookkeeping name it), else the code location that raised it."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            break
        seen = _root_cause(seen)
        if isinstance(seen, OSError) and (seen.filename2 or seen.filename):
            return str(seen.filename2 or seen.filename)
        seen = seen.__cause__ or seen.__context__
    frames = list(traceback.walk_tb(e.__traceback__))
    for frame, _ in reversed(frames):
        held = frame.f_locals.get("path", frame.f_locals.get("p"))
        if isinstance(held, str | os.PathLike) and "/" in str(held):
            return str(held)
    code = frames[-1][0].f_code.co_filename if frames else "medfm ingest"
    return f"{code}:{frames[-1][1]}" if frames else code


def failure_line(e: BaseException, spec: Any, keyring: Any | None, log: str) -> str:
    """Log `e`'s traceback (redacted) and return the one stderr line for it: the file, the
    cause and where the traceback went."""
    trace = "".join(traceback.format_exception(e)).rstrip()
    emit(redact(f"[ingest] failed:\n{trace}", spec, keyring), console=False)
    cause, file = _root_cause(e), _file_of(e)
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    first = (text.strip().splitlines() or [""])[0][:300]
    why = f"{type(cause).__name__}: {first}" if first and first != file else type(cause).__name__
    return redact(f"medfm ingest: {file}: {why} (traceback in {log})", spec, keyring)
