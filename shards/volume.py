"""Zarr v3 storage for volume3d samples: one group per sample, `image` plus optional `label`.

Chunks default to 64^3: a 96^3 training patch touches at most 8 chunks per axis-aligned
neighbourhood, and a compressed 64^3 int16 chunk (~100-300 KB) is a good object-store request
size. The sharding codec packs all chunks of up to 512^3 voxels into one file, so a CT volume is
one or a few files instead of hundreds; its index lets readers fetch single chunks by range.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .errors import ShardFormatError
from .schema import Geometry, Sample
from .storage import commit, is_local, sha256_file, tmp_name
from .tarshard import ShardFile

VOLUME_STORE = "volumes.zarr"
DEFAULT_CHUNKS = (64, 64, 64)
MAX_SHARD_EDGE = 512
ZSTD_LEVEL = 3


def array_sha256(arr: np.ndarray) -> str:
    """Hash of the decoded voxels: C-order, little-endian bytes."""
    a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Whole volume per shard file, rounded up to whole chunks, capped at MAX_SHARD_EDGE."""
    out = []
    for s, c in zip(shape, chunks, strict=True):
        cap = max(c, (MAX_SHARD_EDGE // c) * c)
        out.append(min(math.ceil(s / c) * c, cap))
    return tuple(out)


def zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool = False):
    if is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(fs.unstrip_protocol(path), read_only=read_only)


class VolumeStoreWriter:
    """Write each volume under a temporary group name, then rename it to `volumes.zarr/<key>`."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    ):
        self.fs, self.root, self.chunks = fs, root, tuple(chunks)
        self.store_path = f"{root}/{VOLUME_STORE}"
        self._create_store()

    def _create_store(self) -> None:
        """Create the root group once, race-free: parallel ingest tasks all start here, and
        zarr's own create-if-missing raises ContainsGroupError for every writer but the first."""
        meta = f"{self.store_path}/zarr.json"
        if self.fs.exists(meta):
            return
        tmp = tmp_name(self.store_path)
        zarr.open_group(zarr_store(self.fs, tmp), mode="w")
        self.fs.makedirs(self.store_path, exist_ok=True)
        commit(self.fs, f"{tmp}/zarr.json", meta)  # an atomic rename: readers never see half
        self.fs.rm(tmp, recursive=True)

    def add(self, sample: Sample) -> tuple[str, dict[str, dict[str, Any]], list[ShardFile]]:
        """Store a volume (and label map); returns (group path, members, files written)."""
        rel = f"{VOLUME_STORE}/{sample.key}"
        final = f"{self.root}/{rel}"
        tmp = tmp_name(final)
        attrs = {
            "medfm": {
                "key": sample.key,
                "kind": sample.kind,
                "modality": sample.modality,
                "geometry": sample.geometry.to_dict(),
            }
        }
        group = zarr.open_group(zarr_store(self.fs, tmp), mode="w", attributes=attrs)
        members = {"image": self._write_array(group, "image", sample.data, attrs)}
        if sample.label_map is not None:
            if sample.label_map.shape != sample.data.shape:
                raise ValueError(
                    f"sample {sample.key}: label map shape {sample.label_map.shape} "
                    f"!= image shape {sample.data.shape}"
                )
            members["label"] = self._write_array(group, "label", sample.label_map, attrs)
        commit(self.fs, tmp, final)
        return rel, members, self._files(rel)

    def _write_array(
        self, group: zarr.Group, name: str, data: np.ndarray, attrs: dict[str, Any]
    ) -> dict[str, Any]:
        data = np.asarray(data, dtype=data.dtype.newbyteorder("<"))
        arr = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=self.chunks,
            shards=shard_shape(data.shape, self.chunks),
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            attributes=attrs,
            dimension_names=("i", "j", "k"),
        )
        arr[...] = data
        return {"sha256": array_sha256(data), "shape": list(data.shape), "dtype": data.dtype.str}

    def _files(self, rel: str) -> list[ShardFile]:
        out = []
        for path in sorted(self.fs.find(f"{self.root}/{rel}")):
            digest, size = sha256_file(self.fs, path)
            out.append(ShardFile(path[len(self.root) + 1 :], digest, size))
        return out


@dataclass
class VolumeHandle:
    """Lazy access to a stored volume: slicing `image` reads only the chunks it touches."""

    image: zarr.Array
    label: zarr.Array | None
    geometry: Geometry


def open_volume(
    fs: fsspec.AbstractFileSystem, root: str, row: dict[str, Any], store: Any = None
) -> VolumeHandle:
    """Open the Zarr arrays of a volume3d manifest row. `store` may wrap the default store."""
    where = f"{row['shard']}"
    try:
        grp = zarr.open_group(
            store or zarr_store(fs, f"{root}/{row['shard']}", read_only=True), mode="r"
        )
        image = grp["image"]
        label = grp["label"] if row.get("has_label_map") else None
        geometry = Geometry.from_dict(image.attrs["medfm"]["geometry"])
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise ShardFormatError(f"{where}: cannot open volume ({type(e).__name__}: {e})") from e
    if list(image.shape) != list(row["shape"]):
        raise ShardFormatError(f"{where}: stored shape {image.shape} != manifest {row['shape']}")
    return VolumeHandle(image, label, geometry)
