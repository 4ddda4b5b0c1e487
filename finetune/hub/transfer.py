"""Verified, resumable downloads into a destination folder.

Each file streams into `<name>.part`; an interrupted pull leaves the `.part`, and the next pull
continues from its end instead of starting over. A file only gets its real name once its whole
content hashes to the revision's recorded sha256, so a tampered or truncated download is never
mistaken for a good one. `.medfm-hub.json`, written last, records what the folder holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from tqdm import tqdm

from medfm.io import commit, get_fs, sha256_file, write_json

from .errors import IntegrityError
from .safety import HASH_BLOCK, sniff_pickle

PULL_RECORD = ".medfm-hub.json"


def pull_cache_dir(backend: str, repo: str, revision: str) -> Path:
    """Where `resolve` keeps pulled revisions: one folder per immutable revision id."""
    base = os.environ.get("MEDFM_HUB_CACHE") or Path("~/.cache/medfm/pulls").expanduser()
    return Path(base) / backend / repo / revision


@dataclass
class PullReport:
    """What a pull did: where, which revision, and how many bytes came from where."""

    path: Path
    repo: str
    revision: str
    files: dict[str, dict[str, Any]]
    downloaded_bytes: int = 0
    resumed_bytes: int = 0
    reused_files: list[str] = field(default_factory=list)


def pull_files(
    fs: fsspec.AbstractFileSystem,
    sources: dict[str, str],
    files: dict[str, dict[str, Any]],
    dest: str | Path,
    *,
    repo: str,
    revision: str,
    where: str,
) -> PullReport:
    """Copy `sources[rel]` (paths on `fs`) to `dest/rel`, checking `files[rel]['sha256']`."""
    dest = Path(dest)
    report = PullReport(dest, repo, revision, files)
    total = sum(info["size"] for info in files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {where}", leave=False) as bar:
        for rel, info in files.items():
            target = dest / rel
            if target.is_file() and sha256_file(target) == (info["sha256"], info["size"]):
                report.reused_files.append(rel)
                bar.update(info["size"])
                continue
            _fetch_one(fs, sources[rel], target, info, f"{where}:{rel}", report, bar)
    record = {"repo": repo, "revision": revision, "files": files}
    write_json(dest / PULL_RECORD, record, indent=1)
    return report


def _fetch_one(
    fs: fsspec.AbstractFileSystem,
    src: str,
    target: Path,
    info: dict[str, Any],
    where: str,
    report: PullReport,
    bar: tqdm,
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    sha = hashlib.sha256()
    offset = part.stat().st_size if part.is_file() else 0
    if offset > info["size"]:  # longer than the file can be: not a prefix of it
        part.unlink()
        offset = 0
    if offset:
        with open(part, "rb") as f:
            while block := f.read(HASH_BLOCK):
                sha.update(block)
        report.resumed_bytes += offset
        bar.update(offset)
    try:
        with fs.open(src, "rb") as fin, open(part, "ab") as fout:
            fin.seek(offset)
            while block := fin.read(HASH_BLOCK):
                fout.write(block)
                sha.update(block)
                report.downloaded_bytes += len(block)
                bar.update(len(block))
    except FileNotFoundError as e:
        raise IntegrityError(f"{where}: blob {info['sha256']} is missing from the hub") from e
    digest = sha.hexdigest()
    if digest != info["sha256"] or part.stat().st_size != info["size"]:
        part.unlink()
        raise IntegrityError(
            f"{where}: sha256 mismatch (expected {info['sha256']}, got {digest}); the download "
            "is corrupt or the hub was tampered with. The file was discarded, not used."
        )
    try:
        sniff_pickle(part, where)
    except Exception:
        part.unlink()
        raise
    commit(get_fs(str(target))[0], str(part), str(target))


def verify_folder(dest: str | Path) -> dict[str, Any]:
    """Re-check a pulled folder against its pull record; returns the record."""
    dest = Path(dest)
    record = json.loads((dest / PULL_RECORD).read_text())
    for rel, info in record["files"].items():
        path = dest / rel
        got = sha256_file(path) if path.is_file() else ("missing", 0)
        if got != (info["sha256"], info["size"]):
            raise IntegrityError(
                f"{path}: sha256 mismatch against {record['repo']}@{record['revision'][:12]} "
                f"(expected {info['sha256']}, got {got[0]}); pull again"
            )
    return record
