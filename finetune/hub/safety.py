"""What may come out of a hub: hashes, pickle refusal and safe relative paths.

Model repos in the wild still carry pickled checkpoints (`pytorch_model.bin`, `*.ckpt`). Loading
one runs arbitrary code, so medfm refuses to download them at all, and sniffs every pulled file's
first bytes in case a pickle hides behind an innocent name.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path, PurePosixPath

from .errors import HubError, UnsafeFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
HASH_BLOCK = 1 << 22


def refuse_pickles(names: list[str], where: str) -> None:
    """Raise before anything is downloaded if a repo holds pickle-format files."""
    bad = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if bad:
        raise UnsafeFileError(
            f"{where} contains pickle-format files {bad}: medfm only loads safetensors and "
            "JSON and never unpickles downloaded files. Convert them to safetensors "
            "(safetensors.torch.save_file) and push again."
        )


def sniff_pickle(path: str | Path, where: str) -> None:
    """Refuse a file whose bytes are a pickle or a torch zip checkpoint, whatever its name."""
    with open(path, "rb") as f:
        head = f.read(4)
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                is_pickle = any(n.endswith(".pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            pass
    if is_pickle:
        raise UnsafeFileError(
            f"{where}: file content is a pickle (torch.save/pickle format); refused, never "
            "unpickled. Only safetensors and JSON are loaded."
        )


def check_relpath(rel: str, where: str) -> str:
    """A repo file path must stay inside the destination folder."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise HubError(f"{where}: unsafe file path {rel!r} in revision record")
    return rel


def git_blob_sha1(path: str | Path) -> str:
    """Git's object id of a file: how the HF Hub names small (non-LFS) files."""
    sha = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()
