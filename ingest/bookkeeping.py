"""Resume bookkeeping and the job's side files, all written atomically (temp name + rename).

`_ingest/job.json`   spec fingerprint + key id: `--resume` refuses a different spec or key.
`_ingest/driver.json`  the Ray job id of the last driver: a resumed run on the same cluster
    waits until Ray has declared that driver's job dead, so its last tasks cannot race.
`_ingest/parts/<task>.json`  one per finished task: its rows, files, quarantine records and
    statistics, written only after the task's shards are committed. A task with a part file is
    never run again; a task without one is re-run from scratch under the same shard prefix, so
    its (deterministic) shards are rewritten byte for byte.
`quarantine.jsonl`   one record per rejected input: source, relative path, error type, reason.
"""

from __future__ import annotations

import json
from typing import Any

from medfm.io import atomic_write_bytes, get_fs

WORK_DIR = "_ingest"
PARTS_DIR = f"{WORK_DIR}/parts"
JOB_FILE = f"{WORK_DIR}/job.json"
STATS_FILE = f"{WORK_DIR}/stats.json"
DRIVER_FILE = f"{WORK_DIR}/driver.json"
QUARANTINE_FILE = "quarantine.jsonl"
REPORT_FILE = "ingest_report.json"


class ResumeError(RuntimeError):
    """The destination holds another job's output, or resuming would mix settings."""


class Bookkeeper:
    def __init__(self, dest: str):
        self.fs, self.root = get_fs(dest)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_json(self, rel: str, obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        atomic_write_bytes(self.fs, self.path(rel), data)

    def read_json(self, rel: str) -> Any | None:
        p = self.path(rel)
        return json.loads(self.fs.cat_file(p)) if self.fs.exists(p) else None

    def start(self, job: dict[str, Any], resume: bool) -> None:
        """Claim the destination for this job, or check that a resumed job is the same job."""
        existing = self.read_json(JOB_FILE)
        if existing is None:
            if self.fs.exists(self.root) and self.fs.ls(self.root):
                raise ResumeError(
                    "the destination is not empty and holds no ingest job; choose an empty folder"
                )
            self.write_json(JOB_FILE, job)
            return
        if not resume:
            raise ResumeError(
                "the destination already holds an ingest job; pass --resume to finish it "
                "(finished work is kept), or choose another folder"
            )
        for field in ("spec", "key_id"):
            if existing.get(field) != job[field]:
                raise ResumeError(
                    f"cannot resume: the {'spec' if field == 'spec' else 'de-identification key'} "
                    "differs from the one that started this job"
                )

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
        self.write_json(f"{PARTS_DIR}/{task_id}.json", part)

    def write_quarantine(self, records: list[dict[str, str]]) -> None:
        records = sorted(records, key=lambda r: (r["source"], r["path"], r["reason"]))
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_bytes(self.fs, self.path(QUARANTINE_FILE), text.encode())
