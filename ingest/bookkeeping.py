"""Resume bookkeeping and the job's side files, all written atomically (temp name + rename).

`_ingest/job.json`   spec fingerprint + a salted scrypt check of the key: `--resume` refuses a
    different spec or key. Private to the job: nothing in the shard set is a fast function of
    the key (privacy.py says why).
`_ingest/lease.json`  who runs the job now (host, pid, heartbeat): one job at a time per
    destination; another job is refused while the holder lives (`Lease`).
`_ingest/driver.json`  the Ray job id of the last driver: a resumed run on the same cluster
    waits until Ray has declared that driver's job dead, so its last tasks cannot race.
`_ingest/parts/<task>.json`  one per finished task: its rows, files, quarantine records and
    statistics, written only after the task's shards are committed. A task with a part file is
    never run again; a task without one is re-run from scratch under the same shard prefix, so
    its (deterministic) shards are rewritten byte for byte.
`_ingest/append.json`  an append in progress (`--append`): the version it adds, its spec
    fingerprint and `--refit`. Re-running the same append resumes it; its cached passes live
    in `_ingest/v<N>/` and its part files beside the first job's (their task ids differ: an
    append's tasks hold only inputs the set does not have). Removed once the version is
    committed; one whose version is already committed is stale and is replaced.
`quarantine.jsonl`   one record per rejected input: source, relative path, error type, reason.

Every quarantine record is written through `scrub_records`, here, whichever reader or error
made it: a reason can quote an OS or library error, and those quote paths (folder names can be
patient names, file names UIDs and dates).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from medfm.io import atomic_write_bytes, get_fs, is_local, tmp_name
from medfm.shards.manifest import HEADER_NAME

from .privacy import SCRYPT, Keyring

WORK_DIR = "_ingest"
LOG_DIR = "_logs"  # the job's logs (ingest/progress.py); `shards verify` checks tars/, Zarr only
PARTS_DIR = f"{WORK_DIR}/parts"
JOB_FILE = f"{WORK_DIR}/job.json"
LEASE_FILE = f"{WORK_DIR}/lease.json"
STATS_FILE = f"{WORK_DIR}/stats.json"
DRIVER_FILE = f"{WORK_DIR}/driver.json"
APPEND_FILE = f"{WORK_DIR}/append.json"
QUARANTINE_FILE = "quarantine.jsonl"
REPORT_FILE = "ingest_report.json"
HEARTBEAT_S = 5.0
STALE_S = 60.0  # twelve missed heartbeats: the holder is gone (or hung, which is as bad)
MAX_REASON = 300

# What a reason may not quote: quoted strings that hold a path separator or a dot (OSError and
# PIL quote file names), anything between path separators, file names, dotted UIDs and dates.
_SCRUB = [
    (re.compile(r"""(['"])[^'"\n]*[/\\.][^'"\n]*\1"""), "<path>"),
    # from the first separator to the last one on the line: unquoted names may hold spaces
    (re.compile(r"[^\s'\"(),;]*[/\\](?:[^'\"(),;\n]*[/\\])?[^\s'\"(),;]*"), "<path>"),
    (re.compile(r"\b\d+(?:\.\d+){3,}\b"), "<uid>"),
    (re.compile(r"\b[\w-]*[A-Za-z_-][\w-]*(?:\.[\w-]+)*\.[A-Za-z][A-Za-z0-9]{0,5}\b"), "<file>"),
    (re.compile(r"\b(?:1[89]|2[0-2])\d{2}-?[01]\d-?[0-3]\d\b"), "<date>"),
]
_COMPRESSED = {"gz", "bz2", "xz", "zst"}
# Dotted words that are not file names: exception classes and the like keep their text.
_NOT_FILES = re.compile(
    r"^(?:e\.g|i\.e)$|^(?:np|numpy|os|ray|zarr|pydicom|PIL|nibabel|sitk|SimpleITK|torch)\."
)


class ResumeError(RuntimeError):
    """The destination cannot take this job now: it holds another job's output, resuming would
    mix settings, a live job holds it, or it is full."""


class LeaseError(ResumeError):
    """Another live job holds the destination."""


class DiskFullError(ResumeError):
    """The destination ran out of space; `--resume` finishes the job once there is room."""


def _file_mark(m: re.Match) -> str:
    """A file name becomes <file> plus its extension, which says which of an item's files
    (header, signal, label) failed without naming it."""
    name = m[0]
    if _NOT_FILES.match(name):
        return name
    parts = name.split(".")
    ext = parts[-2:] if parts[-1].lower() in _COMPRESSED and len(parts) > 2 else parts[-1:]
    return "<file>." + ".".join(ext)


def scrub_reason(reason: str) -> str:
    """A quarantine reason without paths, file names, UIDs or dates, bounded."""
    # Reasons are scrubbed in the task and again when recorded: a marker left by the first pass
    # still stands between two pieces of one path ('<path> John ward 7<path>' from a path with
    # spaces), so it counts as a separator and the second pass stays safe.
    reason = reason.replace("<path>", "/")
    for pattern, mark in _SCRUB:
        if mark == "<file>":
            reason = pattern.sub(_file_mark, reason)
        else:
            reason = pattern.sub(mark, reason)
    return reason[:MAX_REASON]


def scrub_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "reason": scrub_reason(str(r.get("reason", "")))} for r in records]


class Lease:
    """An exclusive claim on a destination, for local disks and object stores.

    `lease.json` holds the holder's host, pid, a random token and a heartbeat (wall-clock
    seconds) that a thread refreshes every `heartbeat_s`. Another job breaks it only when it is
    stale: the holder's pid is dead on this host, or the heartbeat is older than `stale_s`. A
    holder that finds its lease broken (or replaced) stops beating, and `check` raises.
    Creation is exclusive where the store can do it (a hard link on local disks, mode "x"
    elsewhere) and is read back, so two starters never both believe they won.
    """

    def __init__(self, fs, path: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.fs, self.path = fs, path
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = secrets.token_hex(16)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        host, pid = socket.gethostname(), os.getpid()
        return {"host": host, "pid": pid, "token": self.token, "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: judged by the file's age alone
            return {"host": "", "pid": 0, "token": "", "heartbeat": self._mtime()}

    def _mtime(self) -> float:
        try:
            modified = self.fs.modified(self.path)
            return modified.timestamp()
        except (OSError, NotImplementedError):
            return 0.0

    def _create(self) -> bool:
        data = json.dumps(self._record()).encode()
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if is_local(self.fs):  # write it whole under a temp name, then link: atomic and exclusive
            tmp = tmp_name(self.path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except (FileExistsError, FileNotFoundError):  # held; or a holder starting up
                return False  # removed our temporary: it holds the lease either way
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return True
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive mode on this store
            if self.fs.exists(self.path):
                return False
            atomic_write_bytes(self.fs, self.path, data)
        held = self.read()
        return bool(held) and held.get("token") == self.token

    def stale(self, holder: dict[str, Any]) -> bool:
        """Its heartbeat is older than `stale_s`, or its process is gone (on this host)."""
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return True
        if holder.get("host") != socket.gethostname():
            return False  # another host's pid says nothing here: only the heartbeat counts
        pid = int(holder.get("pid", 0))
        if pid <= 0:
            return True
        try:
            os.kill(pid, 0)  # signal 0: tests that the process exists, sends nothing
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            return False
        return False

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            holder = self.read()
            if holder is None:
                continue  # released between our try and our look
            if not self.stale(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseError(
                    f"the destination is in use by a running ingest job (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, last heartbeat {age:.0f} s "
                    f"ago); wait for it to finish, or stop it first (its lease is broken "
                    f"{self.stale_s:.0f} s after its last heartbeat, or at once once its "
                    "process is gone)"
                )
            if self.read() == holder:  # still the stale one: break it
                self.fs.rm_file(self.path)
        raise LeaseError("could not take the destination's lease: another job keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self.read()
            if not held or held.get("token") != self.token:
                self.lost = True
                return
            try:
                atomic_write_bytes(self.fs, self.path, json.dumps(self._record()).encode())
            except OSError:  # a full disk or a store's hiccup: the next beat tries again
                continue

    def check(self) -> None:
        if self.lost:
            raise LeaseError(
                "this job lost its lease on the destination (its heartbeat stalled for over "
                f"{self.stale_s:.0f} s and another job took over); its output was left to that job"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self.read()
        if held and held.get("token") == self.token:
            self.fs.rm_file(self.path)


class Bookkeeper:
    def __init__(self, dest: str):
        self.fs, self.root = get_fs(dest)
        self.appending = 0  # the version an append adds (start_append), else 0

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def job_file(self, rel: str) -> str:
        """A cached pass of this job (`_ingest/stats.json`): an append keeps its own copy under
        `_ingest/v<N>/`, beside the earlier jobs' ones."""
        if not self.appending:
            return rel
        return f"{WORK_DIR}/v{self.appending}/{rel.removeprefix(WORK_DIR + '/')}"

    def write_json(self, rel: str, obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        atomic_write_bytes(self.fs, self.path(rel), data)

    def read_json(self, rel: str) -> Any | None:
        p = self.path(rel)
        return json.loads(self.fs.cat_file(p)) if self.fs.exists(p) else None

    def lease(self, **kw: float) -> Lease:
        return Lease(self.fs, self.path(LEASE_FILE), **kw)

    def start(self, spec_fingerprint: str, keyring: Keyring, resume: bool) -> bool:
        """Claim the destination for this job, or check that a resumed job is the same job.
        Returns True when this call started a new job (so a failed start can undo it)."""
        existing = self.read_json(JOB_FILE)
        if existing is None:
            # The job's own log folder (LOG_DIR) may be there: it opens before this.
            others = [p for p in self._listing() if p.rsplit("/", 1)[-1] not in (WORK_DIR, LOG_DIR)]
            if others or self._listing(WORK_DIR, ignore=LEASE_FILE):
                raise ResumeError(
                    "the destination is not empty and holds no ingest job; choose an empty folder"
                )
            salt = secrets.token_bytes(16)
            check = {"kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": keyring.key_check(salt)}
            self.write_json(JOB_FILE, {"spec": spec_fingerprint, "key_check": check})
            return True
        if not resume:
            raise ResumeError(
                "the destination already holds an ingest job; pass --resume to finish it "
                "(finished work is kept), --append to add new inputs to its finished set, or "
                "choose another folder"
            )
        if self._append_pending():
            raise ResumeError(
                "cannot resume: an append to this set is unfinished; re-run that command "
                "(with --append) to finish it"
            )
        if existing.get("spec") != spec_fingerprint:
            raise ResumeError("cannot resume: the spec differs from the one that started this job")
        if (self.read_json(HEADER_NAME) or {}).get("version", 1) > 1:
            raise ResumeError(
                "cannot resume: this set has versions added by --append since its first job "
                "finished; add inputs with --append"
            )
        self._check_key(existing, keyring, "cannot resume", "started this job")
        return False

    def _check_key(self, job: dict[str, Any], keyring: Keyring, what: str, who: str) -> None:
        check = job.get("key_check") or {}
        if check.get("kdf") != "scrypt":
            raise ResumeError(
                f"{what}: this job was started by an older medfm that kept a fast key "
                "fingerprint; start it again in an empty folder"
            )
        got = keyring.key_check(bytes.fromhex(check["salt"]), check["n"], check["r"], check["p"])
        if not secrets.compare_digest(got, check["hash"]):
            raise ResumeError(f"{what}: the de-identification key differs from the one that {who}")

    def _append_pending(self) -> bool:
        pending = self.read_json(APPEND_FILE) or {}
        newest = (self.read_json(HEADER_NAME) or {}).get("version", 1)
        return pending.get("version", 0) > newest

    def start_append(
        self, spec_fingerprint: str, keyring: Keyring, version: int, refit: bool
    ) -> bool:
        """Claim the destination for an append that adds `version`, or resume the same append.
        The key must be the one that made the set (else its pseudonyms and splits would not
        match): checked against the first job's salted scrypt hash. Returns True when this
        call started the append (so a failed start can undo it, `abandon_append`)."""
        job = self.read_json(JOB_FILE)
        if job is None:
            raise ResumeError(
                f"cannot append: the set's job record {JOB_FILE} is gone, so the "
                "de-identification key cannot be checked against the one that made the set"
            )
        self._check_key(job, keyring, "cannot append", "made this set")
        pending = self.read_json(APPEND_FILE)
        record = {"version": version, "spec": spec_fingerprint, "refit": refit}
        self.appending = version
        if pending is not None and pending.get("version") == version:
            if pending != record:
                raise ResumeError(
                    f"cannot append: an append adding version {version} with another spec or "
                    "--refit setting is unfinished; re-run that command to finish it"
                )
            return False
        self.write_json(APPEND_FILE, record)  # none, or one already committed (stale)
        return True

    def abandon_append(self) -> None:
        """Undo an append's start: its record and cached passes go, the set's earlier jobs'
        bookkeeping stays."""
        for rel in (APPEND_FILE, f"{WORK_DIR}/v{self.appending}"):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)

    def finish_append(self) -> None:
        """The version is committed: the append is no longer pending (its cached passes go)."""
        self.abandon_append()

    def _listing(self, rel: str = "", ignore: str = "") -> list[str]:
        base = self.path(rel) if rel else self.root
        if not self.fs.exists(base):
            return []
        skip = self.path(ignore) if ignore else None
        return [p for p in self.fs.ls(base, detail=False) if p.rstrip("/") != skip]

    def abandon(self) -> None:
        """Undo a new job's start (it failed before converting anything): no job.json or other
        bookkeeping stays behind, so a plain rerun is not refused. The lease stays with its
        holder, who releases it (and then `tidy` removes the empty work folder)."""
        for p in self._listing(WORK_DIR, ignore=LEASE_FILE):
            self.fs.rm(p, recursive=True)

    def tidy(self, created_root: bool = False) -> None:
        """Remove the work folder if nothing is left in it, and the destination too if this
        job created it and left it empty."""
        work = self.path(WORK_DIR)
        if self.fs.exists(work) and not self._listing(WORK_DIR):
            self.fs.rm(work, recursive=True)
        if created_root and self.fs.exists(self.root) and not self._listing():
            self.fs.rm(self.root, recursive=True)

    def finished_parts(self) -> dict[str, dict[str, Any]]:
        base = self.path(PARTS_DIR)
        if not self.fs.exists(base):
            return {}
        out = {}
        for p in sorted(self.fs.ls(base, detail=False)):
            name = p.rsplit("/", 1)[-1]
            if name.endswith(".json") and ".tmp-" not in name:
                out[name[:-5]] = json.loads(self.fs.cat_file(p))
        return out

    def write_part(self, task_id: str, part: dict[str, Any]) -> None:
        part = {**part, "quarantine": scrub_records(part.get("quarantine", []))}
        self.write_json(f"{PARTS_DIR}/{task_id}.json", part)

    def write_quarantine(self, records: list[dict[str, str]]) -> None:
        records = sorted(
            scrub_records(records), key=lambda r: (r["source"], r["path"], r["reason"])
        )
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_bytes(self.fs, self.path(QUARANTINE_FILE), text.encode())
