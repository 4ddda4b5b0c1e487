"""Hub test helpers: small folders to push, and a Hugging Face cache laid out as it is on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from medfm.finetune.hub.safety import git_blob_sha1

COMMIT = "a" * 40


def make_folder(path: Path, scale: float = 1.0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(64, 64, generator=g) * scale}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"dim": 64, "scale": scale}))
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "README.md").write_text("# a nested file\n")
    return path


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".medfm-hub.json"
    }


def hf_cache(
    root: Path, repo: str, files: dict[str, bytes], lfs: set[str], ref: str = "main"
) -> Path:
    """models--owner--name/{blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<ref>}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / ref).write_text(COMMIT)
    for name, data in files.items():
        (repo_dir / "blobs").mkdir(exist_ok=True)
        tmp = repo_dir / "blobs" / "tmp"
        tmp.write_bytes(data)
        etag = hashlib.sha256(data).hexdigest() if name in lfs else git_blob_sha1(tmp)
        blob = tmp.rename(repo_dir / "blobs" / etag)
        link = repo_dir / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo_dir


class WritesMarker:
    """Unpickling this creates the marker file: proof, when the file is absent, that nothing
    was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def inject(store: str, repo: str, files: dict[str, bytes], tmp_path: Path) -> None:
    """A revision written past push's checks, as a foreign tool or an attacker would."""
    from medfm.finetune import hub

    local = hub.LocalHub(store)
    table = {}
    for name, data in files.items():
        src = tmp_path / "inject" / name
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        local.put_blob(src, digest)
        table[name] = {"sha256": digest, "size": len(data)}
    local.write_revision(repo, table, "main")
