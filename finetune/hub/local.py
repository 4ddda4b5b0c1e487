"""The embedded hub on a local disk: a folder of content-addressed blobs (the `local` backend).

    <root>/blobs/sha256/<hash>                     file contents, named by their sha256
    <root>/repos/<repo>/revisions/<id>.json        immutable revision: {path: sha256, size}
    <root>/repos/<repo>/refs/<name>                named revision ("main", "v1") -> id
    <root>/index.json                              every repo with its refs (for `ls`)

A revision id is the sha256 of its canonical file table, so it pins content exactly and pushing
the same folder twice gives the same id. A push publishes blobs, then the revision record, then
the ref, then the index: a reader following a ref only ever finds a complete revision. Here each
file is written under a temporary name and renamed into place; `FsspecHub` (fsspec_hub.py) runs
the same logic over any fsspec filesystem and only publishes differently.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from medfm.io import atomic_open, atomic_write_bytes, get_fs, sha256_bytes, sha256_file
from medfm.shards.schema import to_json

from .backend import HUB_BACKENDS, default_root
from .errors import HubError, RevisionNotFoundError
from .safety import check_content, check_relpath, refuse_pickles
from .transfer import PullReport, pull_cache_dir, pull_files

REVISION_FORMAT = "medfm-hub-revision"
FULL_ID_RE = re.compile(r"^[0-9a-f]{64}$")
ID_PREFIX_RE = re.compile(r"^[0-9a-f]{12,64}$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SKIP_NAMES = (".medfm-hub.json",)


def scan_folder(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {sha256, size}} of every file to push; pickles (by name or by
    content), malformed safetensors and links that leave the folder are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder")
    files = {}
    for path in _folder_files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.name in SKIP_NAMES or path.name.endswith(".part"):
            continue
        check_content(path, rel, f"{folder}: {rel}")
        digest, size = sha256_file(path)
        files[rel] = {"sha256": digest, "size": size}
    if not files:
        raise HubError(f"{folder}: nothing to push (empty folder)")
    refuse_pickles(list(files), str(folder))
    return files


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, links not followed out of it: a symlink whose target lies
    outside (a key file, a home directory) would publish that file, so it is refused; a link to
    a file inside is pushed as that file's content. Linked folders are refused: they could loop."""
    root = folder.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    raise HubError(
                        f"{folder}: {rel} is a symlink that leaves the folder or is not a file; "
                        "refused (copy the file in if it belongs in the push)"
                    )
                out.append(path)
            elif name in filenames and path.is_file():
                out.append(path)
    return sorted(out)


@HUB_BACKENDS.register("local")
class LocalHub:
    """A hub in a folder (a path or file:// URL; default $MEDFM_HUB)."""

    def __init__(self, root: str | None = None, **storage_options: Any):
        self.url = root or default_root()
        self.fs, self.root = get_fs(self.url, **storage_options)

    # -- layout --------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest}"

    def _repo_dir(self, repo: str) -> str:
        return f"{self.root}/repos/{repo}"

    def _revision_path(self, repo: str, rev_id: str) -> str:
        return f"{self._repo_dir(repo)}/revisions/{rev_id}.json"

    # -- publishing: the one thing FsspecHub does differently ------------------------------
    def publish_file(self, local_file: str | Path, path: str) -> None:
        """Copy a local file to `path` under a temporary name, renamed into place when whole."""
        with open(local_file, "rb") as src, atomic_open(self.fs, path) as dst:
            shutil.copyfileobj(src, dst)

    def publish_bytes(self, path: str, data: bytes) -> None:
        atomic_write_bytes(self.fs, path, data)

    # -- writing -------------------------------------------------------------------------
    def put_blob(self, local_file: str | Path, digest: str) -> None:
        """Upload one file under its hash; a whole blob that exists is never rewritten."""
        final = self.blob_path(digest)
        if self.fs.exists(final) and self.fs.size(final) == Path(local_file).stat().st_size:
            return
        self.publish_file(local_file, final)

    def write_revision(self, repo: str, files: dict[str, dict[str, Any]], ref: str) -> str:
        """Record a revision (whose blobs must already exist) and point `ref` at it."""
        rev_id = revision_id(files)
        path = self._revision_path(repo, rev_id)
        if not self.fs.exists(path):
            record = {
                "format": REVISION_FORMAT,
                "version": 1,
                "repo": repo,
                "id": rev_id,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "files": files,
            }
            self.publish_bytes(path, json.dumps(record, indent=1).encode())
        self.publish_bytes(f"{self._repo_dir(repo)}/refs/{ref}", rev_id.encode())
        self._write_index()
        return rev_id

    def push(self, folder: str | Path, repo: str, ref: str = "main") -> str:
        """Push a folder as a new revision of `repo`; returns the immutable revision id."""
        check_repo(repo)
        if not REF_RE.match(ref) or FULL_ID_RE.match(ref):
            raise HubError(f"invalid revision name {ref!r}: use [A-Za-z0-9._-], not a hex id")
        files = scan_folder(folder)
        for rel, info in files.items():
            self.put_blob(Path(folder) / rel, info["sha256"])
        return self.write_revision(repo, files, ref)

    def _write_index(self) -> None:
        self.publish_bytes(f"{self.root}/index.json", json.dumps(self.ls(), indent=1).encode())

    # -- reading -------------------------------------------------------------------------
    def ls(self) -> dict[str, dict[str, str]]:
        """{repo: {ref: revision id}} read from the refs themselves (the index is a cache)."""
        out: dict[str, dict[str, str]] = {}
        for ref_path in sorted(self.fs.glob(f"{self.root}/repos/**/refs/*")):
            if ".tmp-" in ref_path:
                continue
            repo = ref_path[len(self.root) + len("/repos/") :].rsplit("/refs/", 1)[0]
            out.setdefault(repo, {})[ref_path.rsplit("/", 1)[1]] = self.fs.cat_file(
                ref_path
            ).decode()
        return out

    def revisions(self, repo: str) -> list[str]:
        paths = self.fs.glob(f"{self._repo_dir(repo)}/revisions/*.json")
        return sorted(p.rsplit("/", 1)[1][:-5] for p in paths if ".tmp-" not in p)

    def resolve_revision(self, repo: str, rev: str | None) -> dict[str, Any]:
        """The revision record for a ref name, a full id or a unique id prefix (>= 12 hex)."""
        check_repo(repo)
        rev = rev or "main"
        refs = self.ls().get(repo, {})
        if rev in refs:
            rev_id = refs[rev]
        elif ID_PREFIX_RE.match(rev):
            hits = [r for r in self.revisions(repo) if r.startswith(rev)]
            if len(hits) > 1:
                raise HubError(f"{repo}@{rev}: ambiguous revision prefix ({len(hits)} match)")
            rev_id = hits[0] if hits else ""
        else:
            rev_id = ""
        if not rev_id:
            known = ", ".join(sorted(refs)) or "none"
            raise RevisionNotFoundError(
                f"{repo}@{rev}: no such revision in hub {self.url} (named revisions: {known})"
            )
        path = self._revision_path(repo, rev_id)
        try:
            record = json.loads(self.fs.cat_file(path))
        except FileNotFoundError as e:
            raise RevisionNotFoundError(f"{repo}@{rev}: revision record {rev_id} missing") from e
        if record.get("format") != REVISION_FORMAT or record.get("id") != rev_id:
            raise HubError(f"{path}: not a valid revision record")
        if revision_id(record["files"]) != rev_id:
            raise HubError(f"{path}: file table does not hash to its id {rev_id} (tampered)")
        return record

    def resolve(self, repo: str, rev: str | None) -> str:
        return self.resolve_revision(repo, rev)["id"]

    def pull(self, repo: str, rev: str | None, dest: str | Path | None = None) -> PullReport:
        """Download a revision into `dest` (default: the pull cache), verifying every file."""
        record = self.resolve_revision(repo, rev)
        # One cache for every embedded hub, local or fsspec: a revision id pins its content.
        dest = dest or pull_cache_dir("local", repo, record["id"])
        where = f"{repo}@{record['id'][:12]}"
        for rel in record["files"]:
            check_relpath(rel, where)
        refuse_pickles(list(record["files"]), where)
        sources = {rel: self.blob_path(info["sha256"]) for rel, info in record["files"].items()}
        return pull_files(
            self.fs, sources, record["files"], dest, repo=repo, revision=record["id"], where=where
        )


def check_repo(repo: str) -> str:
    parts = repo.split("/")
    if not 1 <= len(parts) <= 2 or not all(REF_RE.match(p) for p in parts):
        raise HubError(f"invalid repo name {repo!r}: use NAME or OWNER/NAME of [A-Za-z0-9._-]")
    return repo


def revision_id(files: dict[str, dict[str, Any]]) -> str:
    return sha256_bytes(to_json({"files": files}).encode())
