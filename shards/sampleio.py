"""Per-process readers behind the datasets: tar members by byte range, Zarr volumes by chunk.

Both keep a few handles open (a training epoch touches the same shards over and over) and drop
them after a fork, because a forked DataLoader worker must not share its parent's remote
sessions.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest
from zarr.storage import WrapperStore

from medfm.io import is_local

from .errors import ShardFormatError
from .volume import VolumeArray, VolumeHandle, open_volume, zarr_store

OPEN_HANDLES = 16
# Object stores: the spans a worker reads next that lie closer than this in one shard are one
# request (a few tar headers apart); farther ones are separate, concurrent requests.
PREFETCH_GAP = 4096


class HandleCache:
    """A small LRU of open handles, emptied when the process id changes (after fork)."""

    def __init__(self, close: Callable[[Any], None] | None = None, size: int = OPEN_HANDLES):
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._pid, self._close, self._size = os.getpid(), close, size

    def get(self, key: str, opener: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            self._items.clear()  # inherited from the parent: not ours to use or close
            self._pid = os.getpid()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = opener()
        if len(self._items) > self._size:
            _, old = self._items.popitem(last=False)
            if self._close:
                self._close(old)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"_items": OrderedDict(), "_pid": -1, "_close": self._close, "_size": self._size}


def _close_handle(h: Any) -> None:
    if isinstance(h, int):
        os.close(h)
    else:
        h.close()


class TarRangeReader:
    """Reads byte spans of tar shards: `os.pread` locally; on object stores, spans announced by
    `prefetch` come from one concurrent batch of ranged GETs, any other span from its own."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root, self.local = fs, root, is_local(fs)
        self._handles = HandleCache(_close_handle)
        self._ahead: dict[tuple[str, int, int], bytes] = {}

    def prefetch(self, spans: list[tuple[str, int, int]]) -> None:
        """Fetch the (shard, offset, size) spans read next, merged where they nearly touch.

        A shuffle buffer emits a shard's samples out of order: a readahead file re-read the
        rest of the shard at every backward seek (4.4x the set's bytes an epoch). Here each
        byte is fetched about once; spans not used before the next call are dropped."""
        self._ahead = {}
        if self.local or not spans:
            return
        merged = _merge_spans(sorted(set(spans)))
        blobs = self.fs.cat_ranges(
            [f"{self.root}/{m.shard}" for m in merged],
            [m.start for m in merged],
            [m.end for m in merged],
        )
        for m, blob in zip(merged, blobs, strict=True):
            if isinstance(blob, bytes):  # a failed range is read again, and reported, by read()
                for span in m.spans:
                    self._ahead[span] = blob[span[1] - m.start : span[1] - m.start + span[2]]

    def read(self, shard: str, offset: int, size: int) -> bytes:
        path = f"{self.root}/{shard}"
        try:
            if self.local:
                fd = self._handles.get(path, lambda: os.open(path, os.O_RDONLY))
                data = os.pread(fd, size, offset)
            else:
                data = self._ahead.pop((shard, offset, size), None)
                if data is None:
                    data = self.fs.cat_file(path, start=offset, end=offset + size)
        except FileNotFoundError as e:
            raise ShardFormatError(f"{shard}: shard file is missing") from e
        except OSError as e:
            raise ShardFormatError(f"{shard}: cannot read ({e})") from e
        if len(data) != size:
            raise ShardFormatError(
                f"{shard}: shard is truncated (wanted bytes {offset}..{offset + size}, "
                f"got {len(data)})"
            )
        return data


@dataclass
class _Request:
    shard: str
    start: int
    end: int
    spans: list[tuple[str, int, int]]


def _merge_spans(spans: list[tuple[str, int, int]]) -> list[_Request]:
    """Sorted (shard, offset, size) spans -> one request per run of nearly touching spans."""
    out: list[_Request] = []
    for span in spans:
        shard, offset, size = span
        if out and out[-1].shard == shard and offset - out[-1].end <= PREFETCH_GAP:
            out[-1].end = max(out[-1].end, offset + size)
            out[-1].spans.append(span)
        else:
            out.append(_Request(shard, offset, offset + size, [span]))
    return out


class StrictStore(WrapperStore):
    """Turns a missing chunk file that the manifest lists into an error.

    Zarr reads an absent chunk as fill value - right for chunks never written (all background),
    silent corruption for chunks that were written and then lost. The manifest header lists every
    file a volume was written with, which tells the two apart.
    """

    def __init__(self, store: Any, expected: frozenset[str], where: str):
        super().__init__(store)
        self.expected, self.where = expected, where

    def _with_store(self, store: Any) -> StrictStore:
        return type(self)(store, self.expected, self.where)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        out = await self._store.get(key, prototype, byte_range)
        if out is None and key in self.expected:
            raise ShardFormatError(f"{self.where}: chunk file {key!r} is missing")
        return out


class CountingStore(WrapperStore):
    """Counts `get` requests and bytes returned: proves which chunks a read touched."""

    def __init__(self, store: Any):
        super().__init__(store)
        self.reset()

    def reset(self) -> None:
        self.requests: list[tuple[str, ByteRequest | None, int]] = []

    @property
    def bytes_read(self) -> int:
        return sum(n for _, _, n in self.requests)

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        out = await self._store.get(key, prototype, byte_range)
        if out is not None:
            self.requests.append((key, byte_range, len(out)))
        return out


class VolumeReader:
    """Opens Zarr volumes of a shard set with missing-chunk detection, caching open handles."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        files: frozenset[str],
        store_wrapper: Callable[[Any], Any] | None = None,
    ):
        self.fs, self.root, self.files = fs, root, files
        self.store_wrapper = store_wrapper
        self._handles = HandleCache(size=8)

    def open(self, row: dict[str, Any]) -> VolumeHandle:
        return self._handles.get(row["shard"], lambda: self._open(row))

    def _open(self, row: dict[str, Any]) -> VolumeHandle:
        group = row["shard"]
        expected = frozenset(f[len(group) + 1 :] for f in self.files if f.startswith(group + "/"))
        base = zarr_store(self.fs, f"{self.root}/{group}", read_only=True)
        store = StrictStore(base, expected, f"{group} (sample {row['key']})")
        if self.store_wrapper is not None:
            store = self.store_wrapper(store)
        if not self.fs.exists(f"{self.root}/{group}"):
            raise ShardFormatError(f"{group}: volume group is missing (sample {row['key']})")
        return open_volume(self.fs, self.root, row, store=store)


def read_region(arr: VolumeArray, where: str, region: tuple[slice, ...]) -> Any:
    """Slice a stored array; any decoding failure becomes a ShardFormatError naming the volume."""
    try:
        return arr[region]
    except ShardFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - codecs raise many types for corrupt bytes
        raise ShardFormatError(f"{where}: unreadable volume data ({type(e).__name__}: {e})") from e
