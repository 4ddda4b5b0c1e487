"""The checkpoint hub: push and pull encoders and adapters, verified, pickle-free, atomic.

References name a repo and an optional revision (a named ref or an immutable id):

    owner/name[@rev]          the embedded hub at MEDFM_HUB (default ~/.cache/medfm/hub)
    hf://owner/name[@rev]     the Hugging Face Hub (works offline with HF_HUB_OFFLINE=1)
    hub://owner/name[@rev]    either of the above as a path anywhere a checkpoint is taken

`resolve("hub://owner/name@v1")` returns a verified local folder; plain paths pass through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import hf
from .errors import HubError, IntegrityError, RevisionNotFoundError, UnsafeFileError
from .local import LocalHub, check_repo, scan_folder
from .transfer import PullReport, verify_folder

HUB_SCHEME = "hub://"
HF_SCHEME = "hf://"

__all__ = [
    "HubError",
    "HubRef",
    "IntegrityError",
    "LocalHub",
    "PullReport",
    "RevisionNotFoundError",
    "UnsafeFileError",
    "is_hub_uri",
    "ls",
    "parse_ref",
    "pull",
    "push",
    "resolve",
    "verify_folder",
]


@dataclass(frozen=True)
class HubRef:
    backend: str  # "local" or "hf"
    repo: str
    rev: str | None

    def __str__(self) -> str:
        prefix = HF_SCHEME if self.backend == "hf" else ""
        return f"{prefix}{self.repo}" + (f"@{self.rev}" if self.rev else "")


def parse_ref(spec: str) -> HubRef:
    """`[hub://][hf://]REPO[@REV]` -> HubRef."""
    body = spec.removeprefix(HUB_SCHEME)
    backend = "hf" if body.startswith(HF_SCHEME) else "local"
    body = body.removeprefix(HF_SCHEME)
    repo, _, rev = body.partition("@")
    if _ and not rev:
        raise HubError(f"{spec!r}: empty revision after '@'")
    return HubRef(backend, check_repo(repo), rev or None)


def is_hub_uri(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith((HUB_SCHEME, HF_SCHEME))


def push(folder: str | Path, spec: str, hub: str | None = None) -> str:
    """Push `folder` as a revision of REPO (named REV, default main); returns its immutable id."""
    ref = parse_ref(spec)
    if ref.backend == "hf":
        return hf.push(folder, ref.repo, ref.rev or "main", scan_folder(folder))
    return LocalHub(hub).push(folder, ref.repo, ref.rev or "main")


def pull(spec: str, dest: str | Path | None = None, hub: str | None = None) -> PullReport:
    """Pull REPO[@REV] into `dest` (default: a per-revision cache folder), verifying sha256."""
    ref = parse_ref(spec)
    if ref.backend == "hf":
        return hf.pull(ref.repo, ref.rev, dest)
    return LocalHub(hub).pull(ref.repo, ref.rev, dest)


def ls(hub: str | None = None, include_hf_cache: bool = True) -> dict[str, dict[str, str]]:
    """{repo: {ref: revision id}} of the embedded hub, plus the repos in the local HF cache."""
    out = LocalHub(hub).ls()
    if include_hf_cache:
        out.update(hf.ls())
    return out


def resolve(path_or_uri: str | Path, hub: str | None = None) -> Path:
    """A local folder or file for a path or a `hub://` / `hf://` reference (pulled and verified)."""
    if not is_hub_uri(path_or_uri):
        return Path(path_or_uri).expanduser()
    return pull(str(path_or_uri), hub=hub).path
