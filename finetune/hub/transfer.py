"""Verified, resumable downloads: a pulled folder holds exactly one revision's files, or nothing.

A pull builds the revision in a staging folder beside the destination
(`.<dest name>.medfm-pull`): each file streams into `<name>.part` there, gets its real name only
once its whole content hashes to the revision's recorded sha256 and passes the content checks
(no pickle, parseable safetensors and JSON), and `.medfm-hub.json`, written last, records what
the folder holds. Only then does the staging folder replace the destination, as a whole. So
files of an earlier revision or planted in the cache do not survive a pull, and a failed pull
leaves the destination as it was. An interrupted transfer keeps its `.part` files in the staging
folder and the next pull continues from their end; a failed check discards the staging folder.
Nothing in a destination or staging folder is trusted: links are never followed or written
through, and a file is only reused when it is a plain file with the recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from tqdm import tqdm

from medfm.io import commit, get_fs, sha256_file, write_json

from .errors import HubError, IntegrityError
from .safety import HASH_BLOCK, check_content

PULL_RECORD = ".medfm-hub.json"
STAGING_SUFFIX = ".medfm-pull"


def pull_cache_dir(backend: str, repo: str, revision: str) -> Path:
    """Where `resolve` keeps pulled revisions: one folder per immutable revision id."""
    base = os.environ.get("MEDFM_HUB_CACHE") or Path("~/.cache/medfm/pulls").expanduser()
    return Path(base) / backend / repo / revision


def staging_dir(dest: str | Path) -> Path:
    """Where a pull into `dest` builds the revision (and keeps `.part` files to resume)."""
    dest = Path(os.path.abspath(dest))
    return dest.with_name(f".{dest.name}{STAGING_SUFFIX}")


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
    """Make `dest` hold exactly `files` (copied from `sources[rel]` on `fs`), each verified."""
    dest = Path(os.path.abspath(dest))
    report = PullReport(dest, repo, revision, files)
    record = {"repo": repo, "revision": revision, "files": files}
    if _holds_exactly(dest, record, where):
        report.reused_files = list(files)
        return report
    _check_replaceable(dest)
    stage = staging_dir(dest)
    _real_dir(stage)
    try:
        _fill(fs, sources, files, dest, stage, where, report)
        write_json(stage / PULL_RECORD, record, indent=1)
    except HubError:
        shutil.rmtree(stage, ignore_errors=True)  # nothing of a refused revision is kept
        raise
    if dest.is_symlink():
        dest.unlink()
    commit(get_fs(str(dest))[0], str(stage), str(dest))
    return report


def _fill(
    fs: fsspec.AbstractFileSystem,
    sources: dict[str, str],
    files: dict[str, dict[str, Any]],
    dest: Path,
    stage: Path,
    where: str,
    report: PullReport,
) -> None:
    total = sum(info["size"] for info in files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {where}", leave=False) as bar:
        for rel, info in files.items():
            target = stage / rel
            _real_dir(target.parent, stage)
            if _plain_file(target, stage) and sha256_file(target) == (info["sha256"], info["size"]):
                pass  # built by an earlier, interrupted pull
            elif _plain_file(dest / rel, dest) and sha256_file(dest / rel) == (
                info["sha256"],
                info["size"],
            ):
                _remove(target)
                shutil.copyfile(dest / rel, target, follow_symlinks=False)
            else:
                _remove(target)
                _fetch_one(fs, sources[rel], target, info, f"{where}:{rel}", report, bar)
                check_content(target, rel, f"{where}:{rel}")
                continue
            check_content(target, rel, f"{where}:{rel}")
            report.reused_files.append(rel)
            bar.update(info["size"])


def _fetch_one(
    fs: fsspec.AbstractFileSystem,
    src: str,
    target: Path,
    info: dict[str, Any],
    where: str,
    report: PullReport,
    bar: tqdm,
) -> None:
    part = target.with_name(target.name + ".part")
    sha = hashlib.sha256()
    if not _plain_file(part, target.parent) or part.stat().st_size > info["size"]:
        _remove(part)  # a link, or longer than the file can be: not a prefix of it
    offset = part.stat().st_size if part.exists() else 0
    if offset:
        with open(part, "rb") as f:
            while block := f.read(HASH_BLOCK):
                sha.update(block)
        report.resumed_bytes += offset
        bar.update(offset)
    # O_NOFOLLOW: a link planted between the check above and here is refused, not written through
    fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        with fs.open(src, "rb") as fin, os.fdopen(fd, "ab") as fout:
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
    os.replace(part, target)


def _plain_file(path: Path, root: Path) -> bool:
    """A regular file with one link, reached from `root` through no symlink at all."""
    try:
        rel_parts = path.relative_to(root).parts
        for i in range(len(rel_parts)):
            if (root.joinpath(*rel_parts[: i + 1])).is_symlink():
                return False
        st = path.lstat()
    except (ValueError, OSError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _real_dir(path: Path, root: Path | None = None) -> None:
    """Make `path` and each folder between `root` and it a real folder (links and files that
    stand in the way are removed, never followed)."""
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        chain = [path]
    else:
        parts = path.relative_to(root).parts
        chain = [root] + [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]
    for p in chain:
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        p.mkdir(exist_ok=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _check_replaceable(dest: Path) -> None:
    """A pull replaces its destination as a whole: so only an earlier pull, or a folder holding
    nothing but `.part` leftovers of an interrupted one (or nothing at all)."""
    if dest.is_symlink() or not dest.exists():
        return
    leftovers = dest.is_dir() and all(
        n.endswith(".part") for _, _, names in os.walk(dest) for n in names
    )
    if not (leftovers or (dest / PULL_RECORD).is_file()):
        raise HubError(
            f"{dest}: exists and is not a pulled folder (no {PULL_RECORD}); a pull replaces its "
            "destination with exactly the revision's files, so pick an empty or new folder"
        )


def _holds_exactly(dest: Path, record: dict[str, Any], where: str) -> bool:
    """True when `dest` is already this revision: its record, and only its files, verified."""
    if not _plain_file(dest / PULL_RECORD, dest) or dest.is_symlink():
        return False
    try:
        if json.loads((dest / PULL_RECORD).read_text()) != record:
            return False
    except (OSError, ValueError):
        return False
    present = set()
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if name in filenames or path.is_symlink():
                present.add(path.relative_to(dest).as_posix())
    if present != set(record["files"]) | {PULL_RECORD}:
        return False
    for rel, info in record["files"].items():
        if not _plain_file(dest / rel, dest) or sha256_file(dest / rel) != (
            info["sha256"],
            info["size"],
        ):
            return False
        check_content(dest / rel, rel, f"{where}:{rel}")
    return True


def verify_folder(dest: str | Path) -> dict[str, Any]:
    """Re-check a pulled folder against its pull record; returns the record."""
    dest = Path(dest)
    record = json.loads((dest / PULL_RECORD).read_text())
    for rel, info in record["files"].items():
        path = dest / rel
        got = sha256_file(path) if _plain_file(path, dest) else ("missing", 0)
        if got != (info["sha256"], info["size"]):
            raise IntegrityError(
                f"{path}: sha256 mismatch against {record['repo']}@{record['revision'][:12]} "
                f"(expected {info['sha256']}, got {got[0]}); pull again"
            )
    return record
