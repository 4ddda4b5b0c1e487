"""The checkpoint hub: push and pull encoders and adapters, verified, pickle-free, atomic.

References name a repo and an optional revision (a named ref or an immutable id):

    owner/name[@rev]          the hub at `hub=` or MEDFM_HUB (default ~/.cache/medfm/hub)
    NAME://owner/name[@rev]   backend NAME at its default location: hf:// is the Hugging Face Hub
                              (works offline with HF_HUB_OFFLINE=1)
    hub://owner/name[@rev]    either of the above as a path anywhere a checkpoint is taken

The hub location's URL scheme picks the backend from `HUB_BACKENDS` (backend.py): a path or
file:// is the local hub, memory://, s3://... the fsspec hub. Every call goes through the
`HubBackend` protocol. `resolve("hub://owner/name@v1")` returns a verified local folder; plain
paths pass through.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from medfm.io import get_tree, is_remote

from .backend import HUB_BACKENDS, HubBackend, backend_class, open_hub
from .errors import HubError, IntegrityError, RevisionNotFoundError, UnsafeFileError
from .fsspec_hub import FsspecHub
from .hf import HfHub
from .local import LocalHub, check_repo
from .transfer import PullReport, verify_folder

HUB_SCHEME = "hub://"
SCHEME_SEP = "://"

__all__ = [
    "HUB_BACKENDS",
    "FsspecHub",
    "HfHub",
    "HubBackend",
    "HubError",
    "HubRef",
    "IntegrityError",
    "LocalHub",
    "PullReport",
    "RevisionNotFoundError",
    "UnsafeFileError",
    "is_hub_uri",
    "ls",
    "open_hub",
    "parse_ref",
    "pull",
    "push",
    "resolve",
    "verify_folder",
]


@dataclass(frozen=True)
class HubRef:
    scheme: str | None  # a backend name ("hf"), or None: the hub at `hub=` / MEDFM_HUB
    repo: str
    rev: str | None

    def __str__(self) -> str:
        prefix = f"{self.scheme}{SCHEME_SEP}" if self.scheme else ""
        return f"{prefix}{self.repo}" + (f"@{self.rev}" if self.rev else "")

    def backend(self, hub: str | None = None) -> HubBackend:
        """The backend holding this repo: the one its scheme names, else the hub at `hub`."""
        if self.scheme:
            return backend_class(self.scheme, str(self))(None)
        return open_hub(hub)


def parse_ref(spec: str) -> HubRef:
    """`[hub://][BACKEND://]REPO[@REV]` -> HubRef; BACKEND must be a registered backend."""
    body = spec.removeprefix(HUB_SCHEME)
    head, sep, tail = body.partition(SCHEME_SEP)
    scheme, body = (head, tail) if sep else (None, body)
    if scheme is not None:
        backend_class(scheme, spec)  # an unknown scheme fails here, naming the known ones
    repo, at, rev = body.partition("@")
    if at and not rev:
        raise HubError(f"{spec!r}: empty revision after '@'")
    return HubRef(scheme, check_repo(repo), rev or None)


def is_hub_uri(path: str | Path) -> bool:
    """`hub://...`, or `NAME://...` for a registered backend NAME (hf://)."""
    if not isinstance(path, str):
        return False
    scheme, sep, _ = path.partition(SCHEME_SEP)
    return path.startswith(HUB_SCHEME) or (bool(sep) and scheme in HUB_BACKENDS)


def push(folder: str | Path, spec: str, hub: str | None = None) -> str:
    """Push `folder` as a revision of REPO (named REV, default main); returns its immutable id.
    A folder on an object store (an export written to s3://) is copied here first: the backends
    hash and check a local tree before anything is uploaded."""
    ref = parse_ref(spec)
    if not is_remote(folder):
        return ref.backend(hub).push(folder, ref.repo, ref.rev or "main")
    with tempfile.TemporaryDirectory(prefix="medfm-push-") as tmp:
        local = Path(tmp) / "export"
        if not get_tree(str(folder), local):
            raise HubError(f"{folder}: nothing to push (no files there)")
        return ref.backend(hub).push(local, ref.repo, ref.rev or "main")


def pull(spec: str, dest: str | Path | None = None, hub: str | None = None) -> PullReport:
    """Pull REPO[@REV] into `dest` (default: a per-revision cache folder), verifying sha256."""
    ref = parse_ref(spec)
    return ref.backend(hub).pull(ref.repo, ref.rev, dest)


def ls(hub: str | None = None, include_hf_cache: bool = True) -> dict[str, dict[str, str]]:
    """{repo: {ref: revision id}} of the hub at `hub`, plus the repos in the local HF cache."""
    out = open_hub(hub).ls()
    if include_hf_cache:
        out.update(HfHub().ls())
    return out


def resolve(path_or_uri: str | Path, hub: str | None = None) -> Path:
    """A local folder or file for a path or a `hub://` / `hf://` reference (pulled and verified)."""
    if not is_hub_uri(path_or_uri):
        return Path(path_or_uri).expanduser()
    return pull(str(path_or_uri), hub=hub).path
