"""WebDataset-compatible tar shards: a rolling writer and a reader that never extracts.

Members are `<key>.<ext>` or `<key>.<component>.<ext>`, all regular files with fixed mode, owner
and mtime, so the same samples always produce the same bytes (and the same shard hash).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from medfm.io import HashingWriter, commit, fsync_file, sha256_bytes, tmp_name

from .codecs import limits
from .errors import ShardFormatError, UnsafeMemberError
from .schema import MEMBER_RE

# 512 MiB: inside the 256 MB - 1 GB range that WebDataset and MosaicML recommend; large enough
# for efficient sequential reads from object stores, small enough to spread over many workers.
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024
TAR_DIR = "tars"
BLOCK = 512
NUL_BLOCK = bytes(BLOCK)
RECORD = tarfile.RECORDSIZE
READ_PIECE = 16 * 1024 * 1024


@dataclass
class MemberLocation:
    """Where one member's bytes sit inside its tar shard."""

    sha256: str
    offset: int
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "offset": self.offset, "size": self.size}


@dataclass
class ShardFile:
    """A finished shard file and its integrity record."""

    path: str  # relative to the shard-set root
    sha256: str
    bytes: int
    samples: int = 0


def _header_template() -> tuple[bytes, int]:
    """tarfile's own ustar header of a regular file (mode 0444, owner 0, mtime 0), and its
    checksum without the name and size fields: `ustar_header` fills in those two per member."""
    info = tarfile.TarInfo("x")
    info.mode, info.mtime = 0o444, 0
    buf = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    # The checksum counts its own field as eight spaces.
    return buf, sum(buf[100:124]) + sum(buf[136:148]) + 8 * ord(" ") + sum(buf[156:])


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a member `name` of `size` bytes, built without a
    TarInfo (whose copy and field-by-field encoding cost more than the member's own bytes)."""
    if size >= 8**11:  # tarfile's ustar limit, the same refusal
        raise ValueError(f"member {name!r} of {size} bytes is over the ustar size limit")
    raw_name, size_field = name.encode("ascii"), b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(raw_name) + sum(size_field)
    return b"".join((raw_name, bytes(100 - len(raw_name)), _TEMPLATE[100:124], size_field,
                     _TEMPLATE[136:148], b"%06o\0 " % chksum, _TEMPLATE[156:]))  # fmt: skip


class TarShardWriter:
    """Append samples to `tars/<prefix>-NNNNNN.tar`, rolling over at `max_bytes`."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        prefix: str,
        max_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        if not MEMBER_RE.fullmatch(f"{prefix}.tar"):
            raise ValueError(f"invalid shard prefix {prefix!r}")
        self.fs, self.root, self.prefix, self.max_bytes = fs, root, prefix, max_bytes
        self.finished: list[ShardFile] = []
        self._index = 0
        self._open_shard: tuple[str, str, IO[bytes], HashingWriter] | None = None
        self._samples = self._offset = 0
        fs.makedirs(f"{root}/{TAR_DIR}", exist_ok=True)

    @property
    def current_path(self) -> str | None:
        return self._open_shard[0] if self._open_shard else None

    def add(self, key: str, members: dict[str, bytes]) -> tuple[str, dict[str, MemberLocation]]:
        """Write one sample's members; returns (shard relative path, locations by extension)."""
        size = sum(BLOCK + len(b) + BLOCK - 1 for b in members.values())
        if self._open_shard and self._samples and self._offset + size > self.max_bytes:
            self._finish()
        if not self._open_shard:
            self._start()
        rel, _, _, hw = self._open_shard
        out, parts, offset = {}, [], self._offset
        for ext, payload in members.items():
            name = f"{key}.{ext}"
            if not MEMBER_RE.fullmatch(name) or len(name) > 100:  # USTAR's name field is 100 bytes
                raise ValueError(f"invalid tar member name {name!r}")
            padding = -len(payload) % BLOCK
            parts += (ustar_header(name, len(payload)), payload, NUL_BLOCK[:padding])
            out[ext] = MemberLocation(sha256_bytes(payload), offset + BLOCK, len(payload))
            offset += BLOCK + len(payload) + padding
        hw.write(b"".join(parts))  # one write and one hash update per sample
        self._offset = offset
        self._samples += 1
        return rel, out

    def close(self) -> list[ShardFile]:
        if self._open_shard:
            self._finish()
        return self.finished

    def abort(self) -> None:
        """Drop the shard being written (its temporary file) without committing it."""
        if self._open_shard:
            _, tmp, raw, _ = self._open_shard
            raw.close()
            self.fs.rm(tmp)
            self._open_shard = None

    def _start(self) -> None:
        rel = f"{TAR_DIR}/{self.prefix}-{self._index:06d}.tar"
        self._index += 1
        tmp = tmp_name(f"{self.root}/{rel}")
        raw = self.fs.open(tmp, "wb")
        self._open_shard = (rel, tmp, raw, HashingWriter(raw))
        self._samples, self._offset = 0, 0

    def _finish(self) -> None:
        rel, tmp, raw, hw = self._open_shard
        # The end of the archive as tarfile writes it: two zero blocks, then zeros up to a
        # whole record (like `tar -b20`).
        end = self._offset + 2 * BLOCK
        hw.write(bytes(2 * BLOCK + -end % RECORD))
        fsync_file(raw)
        raw.close()
        commit(self.fs, tmp, f"{self.root}/{rel}")
        self.finished.append(ShardFile(rel, hw.sha.hexdigest(), hw.nbytes, self._samples))
        self._open_shard = None


def check_member(info: tarfile.TarInfo, shard: str) -> None:
    """Refuse anything but a plainly named regular file; nothing is ever extracted."""
    kind = (
        "symlink"
        if info.issym()
        else "hard link"
        if info.islnk()
        else "device"
        if (info.ischr() or info.isblk())
        else "fifo"
        if info.isfifo()
        else "directory"
        if info.isdir()
        else None
        if info.isreg()
        else "special file"
    )
    if kind:
        raise UnsafeMemberError(f"{shard}: member {info.name!r} is a {kind}; refused")
    if info.name.startswith("/") or ".." in info.name.split("/") or "/" in info.name:
        raise UnsafeMemberError(f"{shard}: member path {info.name!r} escapes the shard; refused")
    # fullmatch: MEMBER_RE's `$` would also accept a name ending in a newline.
    if not MEMBER_RE.fullmatch(info.name):
        raise UnsafeMemberError(f"{shard}: member name {info.name!r} is not <key>.<ext>; refused")


def check_member_header(block: bytes, name: str, size: int, where: str) -> None:
    """The 512-byte header right before a member's data, as a byte-range reader sees it: a
    regular file of exactly `name` and `size` (the writer writes plain ustar, so a member's own
    header always precedes its data). A link, a renamed or resized member is refused."""
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError) as e:
        raise ShardFormatError(f"{where}: no valid tar header before the member ({e})") from e
    check_member(info, where)
    if info.name != name or info.size != size:
        raise ShardFormatError(
            f"{where}: the tar header before the recorded offset is {info.name!r} of "
            f"{info.size} bytes, not {name!r} of {size}; refused"
        )


def iter_members(f: IO[bytes], shard: str) -> Iterator[tuple[str, int, bytes]]:
    """Stream (name, data offset, bytes) of every member of a tar, validating each header before
    reading its data. Plain ustar only, as the writer writes: a pax or GNU extension header is a
    member of another type and refused, so no header can make the reader allocate more than
    the member size limit."""
    cap, offset = limits().member_bytes, 0
    while True:
        block = _read_exact(f, BLOCK, shard)
        if block is None or block == NUL_BLOCK:  # end of the archive
            return
        where = f"{shard}: member at byte {offset}"
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except (tarfile.HeaderError, ValueError) as e:
            raise ShardFormatError(f"{where}: corrupt tar header ({e})") from e
        check_member(info, shard)
        if info.size > cap:
            raise ShardFormatError(
                f"{shard}: member {info.name!r} declares {info.size} bytes, over the "
                f"{cap}-byte member limit; refused"
            )
        data = _read_exact(f, info.size, shard) if info.size else b""
        if data is None or len(data) != info.size:
            got = 0 if data is None else len(data)
            raise ShardFormatError(
                f"{shard}: member {info.name!r} is truncated ({got} of {info.size} bytes)"
            )
        yield info.name, offset + BLOCK, data
        padding = -info.size % BLOCK
        if padding and len(f.read(padding)) != padding:
            raise ShardFormatError(f"{shard}: member {info.name!r} is truncated (padding)")
        offset += BLOCK + info.size + padding


def _read_exact(f: IO[bytes], n: int, shard: str) -> bytes | None:
    """n bytes, fewer at the end of the file, None at its very end. Read in pieces, so a
    declared size larger than the file costs no more memory than the file holds."""
    parts, left = [], n
    try:
        while left:
            piece = f.read(min(left, READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
    except OSError as e:
        raise ShardFormatError(f"{shard}: cannot read ({e})") from e
    if not parts:
        return None
    data = b"".join(parts)
    if len(data) < n and n == BLOCK:
        raise ShardFormatError(f"{shard}: corrupt or truncated tar (partial header block)")
    return data


def iter_samples(f: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members into WebDataset samples: (key, {ext: bytes})."""
    key, parts = None, {}
    for name, _, data in iter_members(f, shard):
        k, ext = name.split(".", 1)
        if key is not None and k != key:
            yield key, parts
            parts = {}
        key = k
        if ext in parts:
            raise ShardFormatError(f"{shard}: duplicate member {name!r}")
        parts[ext] = data
    if key is not None:
        yield key, parts
