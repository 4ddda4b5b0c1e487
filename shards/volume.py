"""Zarr v3 storage for volume3d samples: one group per sample, `image` plus optional `label`.

Chunks default to 64^3: a 96^3 training patch touches at most 8 chunks per axis-aligned
neighbourhood, and a compressed 64^3 int16 chunk (~100-300 KB) is a good object-store request
size. The sharding codec packs all chunks of up to 512^3 voxels into one file, so a CT volume is
one or a few files instead of hundreds; its index lets readers fetch single chunks by range.

Chunks are compressed by zstd level 1 inside Blosc, bytes shuffled, in blocks of 512 KiB (one
block per 64^3 int16 chunk). Against plain zstd level 3, single-threaded on all 64^3 chunks of
two real-CT volumes (the 512x512x300 loader volume, and a 244x202x60 ingest output at 1.5 mm):
2.1x and 3.1x faster to encode, 1.2x and 1.7x faster to decode, files 2 % larger and 6 %
smaller. Shuffling puts the high bytes of neighbouring HU values side by side, which buys back
what the lower level loses; Blosc's default block size at level 1 (tens of KB) costs ratio.

Each sample group also carries OME-Zarr (NGFF 0.5) `multiscales` metadata, so that ome-zarr-py,
napari and other NGFF viewers open it with its voxel spacing, and optionally a downsampled pyramid
(`image_s1`, `image_s2`, ...; `label_s1`, ... beside a label map). NGFF cannot express `direction`
or an LPS `origin`: the `medfm` attributes stay the full geometry (docs/storage.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from medfm.io import commit, is_local, sha256_bytes, sha256_file, tmp_name

from .chunkio import ShardedArrayReader, ShardedLayout, encode_shards
from .errors import ShardFormatError
from .schema import Geometry, Sample
from .tarshard import ShardFile

VOLUME_STORE = "volumes.zarr"
DEFAULT_CHUNKS = (64, 64, 64)
MAX_SHARD_EDGE = 512
BLOSC_BLOCK = 512 * 1024
AXES = ("i", "j", "k")  # NGFF 0.5: a dataset's dimension_names must equal its axes' names
NGFF_VERSION = "0.5"


def volume_codec() -> BloscCodec:
    """zstd level 1 on byte-shuffled voxels (typesize follows the array's dtype)."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=BLOSC_BLOCK)


def array_sha256(arr: np.ndarray) -> str:
    """Hash of the decoded voxels: C-order, little-endian bytes."""
    a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return sha256_bytes(a)  # the buffer itself: no bytes copy


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
        pyramid_levels: int = 0,
    ):
        if not isinstance(pyramid_levels, int) or not 0 <= pyramid_levels <= MAX_PYRAMID_LEVELS:
            raise ValueError(
                f"pyramid_levels must be an integer in [0, {MAX_PYRAMID_LEVELS}], "
                f"not {pyramid_levels!r}"
            )
        self.fs, self.root, self.chunks = fs, root, tuple(chunks)
        self.pyramid_levels = pyramid_levels
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
        # On object stores (s3://, memory://) a prefix exists only while it holds a file: the
        # move above took its only one, so there may be nothing left to delete.
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

    def add(self, sample: Sample) -> tuple[str, dict[str, dict[str, Any]], list[ShardFile]]:
        """Store a volume (and label map); returns (group path, members, files written)."""
        rel = f"{VOLUME_STORE}/{sample.key}"
        final = f"{self.root}/{rel}"
        tmp = tmp_name(final)
        if sample.label_map is not None and sample.label_map.shape != sample.data.shape:
            raise ValueError(
                f"sample {sample.key}: label map shape {sample.label_map.shape} "
                f"!= image shape {sample.data.shape}"
            )
        attrs = {
            "medfm": {
                "key": sample.key,
                "kind": sample.kind,
                "modality": sample.modality,
                "geometry": sample.geometry.to_dict(),
            }
        }
        factors = pyramid_factors(sample.data.shape, sample.geometry.spacing, self.pyramid_levels)
        group_attrs = {**attrs, "ome": ngff_attributes(sample.key, sample.geometry, factors)}
        group = zarr.open_group(zarr_store(self.fs, tmp), mode="w", attributes=group_attrs)
        written: dict[str, tuple[str, int]] = {}  # shard files: (sha256, bytes) by group path
        members = {"image": self._write_array(group, tmp, "image", sample.data, attrs, written)}
        self._write_pyramid(group, tmp, "image", sample.data, factors, downsample_mean, written)
        if sample.label_map is not None:
            members["label"] = self._write_array(
                group, tmp, "label", sample.label_map, attrs, written
            )
            self._write_pyramid(
                group, tmp, "label", sample.label_map, factors, downsample_mode, written
            )
        commit(self.fs, tmp, final)
        return rel, members, self._files(rel, written)

    def _write_pyramid(
        self,
        group: zarr.Group,
        where: str,
        name: str,
        data: np.ndarray,
        factors: list[tuple[int, int, int]],
        downsample: Any,
        written: dict[str, tuple[str, int]],
    ) -> None:
        """Levels `<name>_s1`, ...: each from the one before. No medfm attributes: their
        geometry is the NGFF metadata's, and medfm's readers use the full-resolution array."""
        for level, factor in enumerate(factors[1:], start=1):
            data = downsample(data, factor)
            self._write_array(group, where, f"{name}_s{level}", data, {}, written)

    def _write_array(
        self,
        group: zarr.Group,
        where: str,
        name: str,
        data: np.ndarray,
        attrs: dict[str, Any],
        written: dict[str, tuple[str, int]],
    ) -> dict[str, Any]:
        """zarr writes the array's metadata; chunkio encodes its shard files, written here."""
        data = np.asarray(data, dtype=data.dtype.newbyteorder("<"))
        arr = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=self.chunks,
            shards=shard_shape(data.shape, self.chunks),
            compressors=volume_codec(),
            attributes=attrs,
            dimension_names=AXES,
        )
        layout = ShardedLayout.of(arr)
        if layout is None:  # cannot happen: the layout was created just above
            raise AssertionError(f"unexpected Zarr layout for {name}: {arr.metadata.codecs}")
        for key, blob in encode_shards(layout, data):
            path = f"{where}/{key}"  # the group's store is rooted at `where`
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, blob)
            written[key] = (sha256_bytes(blob), len(blob))
        return {"sha256": array_sha256(data), "shape": list(data.shape), "dtype": data.dtype.str}

    def _files(self, rel: str, written: dict[str, tuple[str, int]]) -> list[ShardFile]:
        """Every file of the group; shard files hashed as they were written, not re-read."""
        out, group = [], f"{self.root}/{rel}"
        for path in sorted(self.fs.find(group)):
            known = written.get(path[len(group) + 1 :])
            digest, size = known or sha256_file(self.fs, path)
            out.append(ShardFile(path[len(self.root) + 1 :], digest, size))
        return out


MAX_PYRAMID_LEVELS = 8


def pyramid_factors(
    shape: tuple[int, ...], spacing: tuple[float, ...], levels: int
) -> list[tuple[int, int, int]]:
    """Downsampling step of each level, level 0 = (1, 1, 1). An axis is halved while its spacing
    is under twice the finest one, so an anisotropic CT halves in-plane first and reaches
    near-isotropic levels; an axis down to one voxel stays. Levels past that point are dropped."""
    out, cur, size = [(1, 1, 1)], np.asarray(spacing, float), np.asarray(shape)
    for _ in range(levels):
        if (size <= 1).all():
            break
        finest = cur[size > 1].min()
        step = np.where((size > 1) & (cur < 2 * finest), 2, 1)
        cur, size = cur * step, -(-size // step)  # ceil division: a partial block is a voxel
        out.append(tuple(int(f) for f in step))
    return out


def ngff_attributes(
    key: str, geometry: Geometry, factors: list[tuple[int, int, int]]
) -> dict[str, Any]:
    """The group's `ome` attribute: one multiscale over `image` (level 0) and its pyramid. A
    level's translation puts its voxel centres at the centre of the level-0 block they average,
    in mm from the centre of voxel (0, 0, 0): the frame is the array's own, not LPS."""
    spacing, total, datasets = np.asarray(geometry.spacing, float), np.ones(3), []
    for level, step in enumerate(factors):
        total = total * step
        datasets.append(
            {
                "path": "image" if level == 0 else f"image_s{level}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": (spacing * total).tolist()},
                    {"type": "translation", "translation": (spacing * (total - 1) / 2).tolist()},
                ],
            }
        )
    axes = [{"name": a, "type": "space", "unit": "millimeter"} for a in AXES]
    return {
        "version": NGFF_VERSION,
        "multiscales": [{"name": key, "axes": axes, "datasets": datasets}],
    }


def _blocks(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """(fi*fj*fk, I/fi, J/fj, K/fk): the voxels of each block along axis 0, each a contiguous
    volume so the reductions below run over whole arrays. Edges are padded by repeating the last
    voxel, which repeats every voxel of an edge block equally often: its mean and its most
    frequent label are those of the voxels present."""
    pad = [(0, -n % f) for n, f in zip(data.shape, factor, strict=True)]
    a = np.pad(data, pad, mode="edge") if any(p for _, p in pad) else data
    shape = [n // f for n, f in zip(a.shape, factor, strict=True)]
    a = a.reshape(shape[0], factor[0], shape[1], factor[1], shape[2], factor[2])
    return np.ascontiguousarray(a.transpose(1, 3, 5, 0, 2, 4)).reshape(-1, *shape)


def downsample_mean(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """Block mean, rounded back to the input's dtype (images)."""
    mean = _blocks(data, factor).mean(axis=0, dtype=np.float64)
    if np.issubdtype(data.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(data.dtype)


def downsample_mode(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """Most frequent label of each block, ties to the smallest value (label maps: a mean would
    invent classes between two neighbours). Pairwise comparisons, as a block holds 8 voxels at
    most: on a 488x404x240 map this takes 0.8 s where a sort of each block took 15 s."""
    b = _blocks(data, factor)

    def count(i: int) -> np.ndarray:  # how many voxels of each block equal its i-th voxel
        return sum((b[i] == b[j]).astype(np.uint8) for j in range(len(b)))

    best, best_count = b[0], count(0)
    for i in range(1, len(b)):
        n = count(i)
        better = (n > best_count) | ((n == best_count) & (b[i] < best))
        best, best_count = np.where(better, b[i], best), np.where(better, n, best_count)
    return best


class VolumeArray:
    """A stored image or label map. Basic slicing reads only the chunks it touches, through
    chunkio's direct path for medfm's own layout and through zarr for any other; every other
    attribute is the zarr array's."""

    def __init__(self, arr: zarr.Array):
        self.zarr = arr
        layout = ShardedLayout.of(arr)
        self._reader = ShardedArrayReader(layout) if layout else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.zarr, name)

    def __getitem__(self, key: Any) -> np.ndarray:
        plan = _basic_region(key, self.zarr.shape) if self._reader else None
        if plan is None:
            return self.zarr[key]
        region, dropped = plan
        out = self._reader.read(region)
        return out[tuple(0 if a in dropped else slice(None) for a in range(out.ndim))]


def _basic_region(key: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], set[int]] | None:
    """(slices, axes indexed by an integer) for ints, unit-step slices and Ellipsis, else None."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        return None
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        return None
    region, dropped = [], set()
    for axis, (k, n) in enumerate(zip(key, shape, strict=True)):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                return None
            region.append(slice(start, max(start, stop)))
        elif isinstance(k, int | np.integer) and -n <= k < n:
            region.append(slice(int(k) % n, int(k) % n + 1))
            dropped.add(axis)
        else:
            return None  # fancy or out-of-range indexing: zarr's rules and errors apply
    return tuple(region), dropped


@dataclass
class VolumeHandle:
    """Lazy access to a stored volume: slicing `image` reads only the chunks it touches."""

    image: VolumeArray
    label: VolumeArray | None
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
        image = VolumeArray(grp["image"])
        label = VolumeArray(grp["label"]) if row.get("has_label_map") else None
        geometry = Geometry.from_dict(image.attrs["medfm"]["geometry"])
    except ShardFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr's metadata parsing raises many types
        raise ShardFormatError(f"{where}: cannot open volume ({type(e).__name__}: {e})") from e
    if list(image.shape) != list(row["shape"]):
        raise ShardFormatError(f"{where}: stored shape {image.shape} != manifest {row['shape']}")
    return VolumeHandle(image, label, geometry)
