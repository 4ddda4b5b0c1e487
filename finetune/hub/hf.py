"""The Hugging Face Hub backend (`hf`), through `huggingface_hub`, online or offline from its cache.

The HF Hub names every file by a content hash: LFS files (weights) by their sha256, small files
by their git blob sha1. A pull checks each downloaded file against that name, whether the
metadata came from the Hub (online) or from the cache's blob names (HF_HUB_OFFLINE=1). The
immutable revision id is the git commit sha.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec

from medfm.io import sha256_file

from .backend import HUB_BACKENDS
from .errors import HubError, IntegrityError, RevisionNotFoundError
from .local import scan_folder
from .safety import git_blob_sha1, refuse_pickles
from .transfer import PullReport, pull_cache_dir, pull_files

TRUTHY = ("1", "true", "yes", "on")
HF_SCHEME = "hf://"


def offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY or constants.HF_HUB_OFFLINE


def cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def _snapshot(repo: str, rev: str | None, *, online_files: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo, revision=rev, cache_dir=cache_dir(), local_files_only=online_files is None
            )
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, FileNotFoundError) as e:
        mode = "offline cache" if online_files is None else "Hugging Face Hub"
        where = f"{HF_SCHEME}{repo}@{rev or 'main'}"
        raise RevisionNotFoundError(f"{where}: not found in {mode} ({e})") from e


def _model_info(repo: str, rev: str | None, files_metadata: bool) -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError as HfRevErr

    try:
        return HfApi().model_info(repo, revision=rev, files_metadata=files_metadata)
    except (RepositoryNotFoundError, HfRevErr) as e:
        raise RevisionNotFoundError(f"{HF_SCHEME}{repo}@{rev or 'main'}: {e}") from e


def _expected_hashes(repo: str, rev: str | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """(commit, {file: {sha256 | git_sha1, size}}) from the Hub's metadata (online only)."""
    info = _model_info(repo, rev, files_metadata=True)
    files = {}
    for s in info.siblings or []:
        if s.lfs is not None:
            files[s.rfilename] = {"sha256": s.lfs.sha256, "size": s.lfs.size}
        else:
            files[s.rfilename] = {"git_sha1": s.blob_id, "size": s.size}
    return info.sha, files


def _cached_hashes(snapshot: Path) -> dict[str, dict[str, Any]]:
    """Expected hashes from the cache's own layout: snapshot links point at blobs/<etag>."""
    files = {}
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = path.relative_to(snapshot).as_posix()
        etag = Path(os.readlink(path)).name if path.is_symlink() else ""
        if len(etag) == 64:
            files[rel] = {"sha256": etag}
        elif len(etag) == 40:
            files[rel] = {"git_sha1": etag}
        else:
            raise IntegrityError(
                f"{path}: cache entry is not a link to a content-named blob; cannot verify it"
            )
    return files


@HUB_BACKENDS.register("hf")
class HfHub:
    """The Hugging Face Hub; it has one location, so `root` may only name it (hf://)."""

    def __init__(self, root: str | None = None):
        if root not in (None, HF_SCHEME):
            raise HubError(f"{root}: the hf backend takes references (hf://owner/name), not a root")

    def pull(self, repo: str, rev: str | None, dest: str | Path | None = None) -> PullReport:
        """Pull an HF repo revision into `dest`, refusing pickles and verifying every file."""
        where = f"{HF_SCHEME}{repo}@{rev or 'main'}"
        if offline():
            snapshot = _snapshot(repo, rev, online_files=None)
            commit = snapshot.name
            expected = _cached_hashes(snapshot)
            refuse_pickles(list(expected), where)
        else:
            commit, expected = _expected_hashes(repo, rev)
            refuse_pickles(list(expected), where)
            snapshot = _snapshot(repo, commit, online_files=list(expected))
        files = {}
        for rel, want in expected.items():
            path = snapshot / rel
            digest, size = sha256_file(path)
            if "sha256" in want:
                ok = digest == want["sha256"]
            else:
                ok = git_blob_sha1(path) == want["git_sha1"]
            if not ok or size != want.get("size", size):
                raise IntegrityError(
                    f"{where}:{rel}: content does not match the Hub's recorded hash "
                    f"{want.get('sha256') or want.get('git_sha1')} (corrupt cache or tampering); "
                    "the file was not used"
                )
            files[rel] = {"sha256": digest, "size": size}
        dest = dest or pull_cache_dir("hf", repo, commit)
        sources = {rel: str(snapshot / rel) for rel in files}
        return pull_files(
            fsspec.filesystem("file"),
            sources,
            files,
            dest,
            repo=f"{HF_SCHEME}{repo}",
            revision=commit,
            where=where,
        )

    def push(self, folder: str | Path, repo: str, ref: str = "main") -> str:
        """Upload a folder as one commit on branch `ref`; returns the commit sha."""
        from huggingface_hub import HfApi

        if offline():
            raise HubError(f"{HF_SCHEME}{repo}: cannot push while HF_HUB_OFFLINE is set")
        files = scan_folder(folder)
        api = HfApi()
        api.create_repo(repo, exist_ok=True, private=True)
        if ref != "main":
            api.create_branch(repo, branch=ref, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            revision=ref,
            allow_patterns=list(files),
            commit_message=f"medfm hub push ({len(files)} files)",
        )
        return info.oid

    def ls(self) -> dict[str, dict[str, str]]:
        """Repos in the local HF cache with their refs (works offline)."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            cache = scan_cache_dir(cache_dir())
        except CacheNotFound:
            return {}
        out = {}
        for r in cache.repos:
            refs = {ref: rev.commit_hash for rev in r.revisions for ref in rev.refs}
            unnamed = {rev.commit_hash[:12]: rev.commit_hash for rev in r.revisions}
            out[f"{HF_SCHEME}{r.repo_id}"] = refs or unnamed
        return out

    def resolve(self, repo: str, rev: str | None) -> str:
        """The commit sha `rev` names: from the cache's refs offline, from the Hub online."""
        if offline():
            return _snapshot(repo, rev, online_files=None).name
        return _model_info(repo, rev, files_metadata=False).sha
