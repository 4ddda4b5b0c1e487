"""The one I/O layer: local paths and fsspec URLs, atomic writes, hashing, temporaries."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARKER = ".tmp-"
HASH_BLOCK = 1 << 22


def get_fs(root: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or any fsspec URL; local paths are made absolute."""
    fs, path = fsspec.core.url_to_fs(str(root), **storage_options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def tmp_name(path: str) -> str:
    return f"{path}{TMP_MARKER}{uuid.uuid4().hex[:12]}"


class HashingWriter:
    """File-like wrapper that hashes and counts bytes as they are written (one pass, no re-read)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, b: bytes) -> int:
        self.raw.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return len(b)

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self.raw.flush()


def fsync_file(f: IO[bytes]) -> None:
    f.flush()
    if hasattr(f, "fileno"):
        try:
            os.fsync(f.fileno())
        except (OSError, ValueError):  # not a real file descriptor (e.g. remote buffer)
            pass


def fsync_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Make a rename durable on local disks; a no-op elsewhere."""
    if not is_local(fs):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    """Move a finished temporary file or folder to its final name, replacing what was there."""
    if is_local(fs):
        if os.path.isdir(final) and not os.path.isdir(tmp):
            raise IsADirectoryError(final)
        if os.path.isdir(tmp) and os.path.exists(final):
            fs.rm(final, recursive=True)
        os.replace(tmp, final)
        fsync_dir(fs, os.path.dirname(final))
    else:  # object stores have no rename; copy-then-delete is the best they offer
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.mv(tmp, final, recursive=True)


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open `path` for writing under a temporary name; rename into place only on success."""
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
            fsync_file(f)
        commit(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed in blocks."""
    sha, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
            n += len(block)
    return sha.hexdigest(), n


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_range(fs: fsspec.AbstractFileSystem, path: str, offset: int, size: int) -> bytes:
    with fs.open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def find_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every leftover temporary file or folder under root (outermost only)."""
    if not fs.exists(root):
        return []
    found: list[str] = []
    for dirpath, dirnames, filenames in fs.walk(root):
        for name in list(dirnames):
            if TMP_MARKER in name:
                found.append(f"{dirpath}/{name}")
                dirnames.remove(name)
        found += [f"{dirpath}/{n}" for n in filenames if TMP_MARKER in n]
    return found


def remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Delete what a killed writer left behind. Call once per job, before writers start."""
    found = find_temporaries(fs, root)
    for path in found:
        fs.rm(path, recursive=True)
    return found
