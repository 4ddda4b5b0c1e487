"""The one I/O layer: local paths and fsspec URLs, atomic writes, hashing, temporaries.

Every helper that names a file takes either a filesystem and a path on it (`fs, path`, what the
stages that already hold a filesystem pass) or one local path / fsspec URL (`"s3://b/x.json"`,
`Path("out/x.json")`). Every output of every stage is written through `atomic_open`, so a killed
writer leaves a temporary name (found by `remove_temporaries`), never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from medfm.config import ConfigError

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

TMP_MARKER = ".tmp-"
HASH_BLOCK = 1 << 22

# A filesystem (then a path on it follows), or a local path or fsspec URL on its own.
Where = fsspec.AbstractFileSystem | str | os.PathLike


# Protocols whose fsspec filesystem `pip install 'medfm[cloud]'` installs.
CLOUD_PROTOCOLS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class MissingExtraError(ConfigError, ImportError):
    """A URL whose filesystem needs a package that is not installed. A ConfigError, so the
    stage CLIs report it in one line with their bad-spec/destination exit code (2)."""


def missing_extra(protocol: str, cause: ImportError) -> MissingExtraError:
    """The error for a URL of `protocol` whose filesystem failed to import. Names the protocol
    only: the URL may hold a bucket or path that should not reach logs."""
    package = CLOUD_PROTOCOLS.get(protocol)
    if package:
        hint = f"need {package}: pip install 'medfm[cloud]'"
    else:
        hint = f"need a package medfm does not install ({cause})"
    return MissingExtraError(f"{protocol}:// URLs {hint}")


def get_fs(root: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or any fsspec URL; local paths are made absolute."""
    try:
        fs, path = fsspec.core.url_to_fs(str(root), **storage_options)
    except ImportError as e:
        raise missing_extra(fsspec.core.split_protocol(str(root))[0] or "file", e) from None
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path.rstrip("/")


def locate(where: Where, path: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) from `fs, path` or from one local path / URL."""
    if isinstance(where, fsspec.AbstractFileSystem):
        if path is None:
            raise TypeError("a filesystem needs a path on it")
        return where, str(path)
    if path is not None:
        raise TypeError("pass a filesystem and a path, or one local path or URL")
    return get_fs(os.fspath(where))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What `get_fs` maps back to (fs, path): a path that travels as one string (to a Ray task,
    into a cached JSON) must keep its protocol, or "bucket/key" reads as a local path."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str | os.PathLike, *parts: str) -> str:
    """A path or URL below `root`: "s3://b/run" + "export" is "s3://b/run/export" (pathlib
    folds "s3://b" into "s3:/b", a local folder named "s3:")."""
    return "/".join([os.fspath(root).rstrip("/"), *parts])


def is_remote(where: str | os.PathLike) -> bool:
    """Whether a path or URL names an object store (anything but the local filesystem)."""
    return not is_local(get_fs(os.fspath(where))[0])


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
        if not fs.isdir(tmp):
            fs.mv(tmp, final)
            return
        # Object by object: fsspec's recursive mv also copies the folder itself, a key that
        # S3 does not have (folders there are only prefixes), and fails on it.
        keys = fs.find(tmp)
        fs.copy(keys, [final + k[len(tmp) :] for k in keys])
        fs.rm(tmp, recursive=True)


@contextmanager
def atomic_open(where: Where, path: str | None = None) -> Iterator[IO[bytes]]:
    """Open a file for writing under a temporary name; rename into place only on success."""
    fs, path = locate(where, path)
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


def write_text(dest: str | os.PathLike, text: str) -> None:
    """UTF-8 text written atomically to a local path or URL."""
    atomic_write_bytes(*locate(dest), text.encode())


def write_json(dest: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """`json.dumps(obj, **dumps)` written atomically to a local path or URL."""
    write_text(dest, json.dumps(obj, **dumps))


def save_safetensors(
    dest: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write tensors as a safetensors file atomically; returns the file's sha256."""
    from safetensors.torch import save  # torch only where tensors are written

    data = save(dict(tensors), metadata=metadata)
    with atomic_open(dest) as f:
        f.write(data)
    return sha256_bytes(data)


def save_figure(fig: Figure, dest: str | os.PathLike, **savefig: Any) -> None:
    """A matplotlib figure saved atomically; the format follows the file name's suffix."""
    fmt = os.path.splitext(os.fspath(dest))[1].lstrip(".") or None
    with atomic_open(dest) as f:
        fig.savefig(f, format=fmt, **savefig)


def sha256_file(where: Where, path: str | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed in blocks."""
    fs, path = locate(where, path)
    sha, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
            n += len(block)
    return sha.hexdigest(), n


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """sha256 hex of anything with the buffer protocol (a C-contiguous ndarray included)."""
    return hashlib.sha256(data).hexdigest()


def read_range(fs: fsspec.AbstractFileSystem, path: str, offset: int, size: int) -> bytes:
    with fs.open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def put_tree(local: str | os.PathLike, dest: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copy a local folder's files below `dest` (a path or URL), each one under a temporary
    name and then committed; the relative paths in `last` go after all others, in that order
    (what readers check first: a record, a manifest). Returns the relative paths copied."""
    fs, root = get_fs(dest)
    base = os.fspath(local)
    names = sorted(
        os.path.relpath(os.path.join(d, n), base).replace(os.sep, "/")
        for d, _, files in os.walk(base)
        for n in files
    )
    order = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in order:
        final = f"{root}/{name}"
        fs.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tmp_name(final)
        fs.put_file(os.path.join(base, name), tmp)
        commit(fs, tmp, final)
    return order


def get_tree(src: str, local: str | os.PathLike) -> list[str]:
    """Copy the files below `src` (a path or URL; leftover temporaries skipped) into a local
    folder; returns the relative paths copied."""
    fs, root = get_fs(src)
    names = []
    for path in fs.find(root):
        name = path[len(root) + 1 :]
        if TMP_MARKER in name:
            continue
        target = os.path.join(os.fspath(local), *name.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target)
        names.append(name)
    return names


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
    """Delete what a killed writer left behind. Call only while no writer runs under root:
    before a job's writers start, or on their folders once they all finished."""
    found = find_temporaries(fs, root)
    for path in found:
        fs.rm(path, recursive=True)
    return found
