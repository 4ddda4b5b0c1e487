"""chunkio writes the bytes zarr writes and reads what zarr reads, on real Zarr stores on disk."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from medfm.shards.chunkio import ShardedArrayReader, ShardedLayout, encode_shards
from medfm.shards.volume import VolumeArray, shard_shape, volume_codec

CHUNKS = (16, 16, 16)


def real_volume(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Voxels of nibabel's example MR tiled to `shape`, with a background slab of zeros, so that
    some chunks are all fill value (zarr does not store those)."""
    anat = np.asanyarray(nib.load(Path(nib.__file__).parent / "tests/data/anatomical.nii").dataobj)
    reps = [-(-s // a) for s, a in zip(shape, anat.shape, strict=True)]
    vol = np.tile(anat, reps)[tuple(slice(0, s) for s in shape)].astype(dtype)
    vol[: shape[0] // 3] = 0
    return vol


def make(root: Path, shape, dtype, compressor=None, shards=True) -> zarr.Array:
    return zarr.open_group(str(root), mode="w").create_array(
        "image",
        shape=shape,
        dtype=dtype,
        chunks=CHUNKS,
        shards=shard_shape(shape, CHUNKS) if shards else None,
        compressors=compressor or volume_codec(),
    )


def write_with_chunkio(root: Path, arr: zarr.Array, data: np.ndarray) -> None:
    """What VolumeStoreWriter does: zarr made the metadata, chunkio encodes the shard files."""
    for key, blob in encode_shards(ShardedLayout.of(arr), data):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(blob)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("c/**/*") if p.is_file()}


CASES = [
    ((64, 64, 32), "int16", None),  # whole chunks, one shard
    ((70, 45, 19), "int16", None),  # edge chunks padded with fill
    ((600, 20, 18), "int16", None),  # more than one shard along an axis (512 cap)
    ((40, 33, 17), "uint8", None),  # label maps
    ((37, 30, 21), "float32", None),
    ((50, 40, 20), "int16", ZstdCodec(level=3)),  # stores written before the Blosc codec
]


@pytest.mark.parametrize(("shape", "dtype", "compressor"), CASES)
def test_shard_files_are_byte_identical_to_zarrs(tmp_path, shape, dtype, compressor):
    data = real_volume(shape, dtype)
    make(tmp_path / "zarr", shape, dtype, compressor)[...] = data
    write_with_chunkio(tmp_path / "ours", make(tmp_path / "ours", shape, dtype, compressor), data)
    ours, theirs = files(tmp_path / "ours"), files(tmp_path / "zarr")
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert ours[key] == theirs[key], key
    at_root = zarr.open_array(str(tmp_path / "ours" / "image"))  # the array is its store's root
    np.testing.assert_array_equal(at_root[...], data)
    np.testing.assert_array_equal(VolumeArray(at_root)[...], data)


@pytest.mark.parametrize(("shape", "dtype", "compressor"), CASES)
def test_region_reads_match_zarr(tmp_path, shape, dtype, compressor):
    data = real_volume(shape, dtype)
    arr = make(tmp_path, shape, dtype, compressor)
    arr[...] = data
    mine = VolumeArray(arr)
    assert mine._reader is not None
    rng = np.random.default_rng(0)
    keys = [..., (slice(None), slice(None), 3), (-1, slice(2, 9), slice(None)), (5, 6, 7)]
    for _ in range(20):
        start = [int(rng.integers(0, s)) for s in shape]
        keys.append(tuple(slice(a, a + int(rng.integers(1, 40))) for a in start))  # may overhang
    for key in keys:
        got = mine[key]
        np.testing.assert_array_equal(got, arr[key], err_msg=str(key))
        assert got.shape == data[key].shape


def test_fill_and_missing_shards_read_as_fill(tmp_path):
    shape = (600, 20, 18)
    data = np.zeros(shape, "int16")
    data[:10] = 7  # only the first shard holds a stored chunk
    arr = make(tmp_path, shape, "int16")
    write_with_chunkio(tmp_path, arr, data)
    assert sorted(files(tmp_path)) == ["image/c/0/0/0"]
    np.testing.assert_array_equal(VolumeArray(arr)[...], data)


def test_other_layouts_fall_back_to_zarr(tmp_path):
    data = real_volume((40, 30, 20), "int16")
    arr = make(tmp_path, data.shape, "int16", shards=False)
    assert ShardedLayout.of(arr) is None
    arr[...] = data
    np.testing.assert_array_equal(VolumeArray(arr)[2:30, ::2, 5], data[2:30, ::2, 5])


def test_corrupt_index_and_truncated_shard_raise(tmp_path):
    data = real_volume((40, 30, 20), "int16")
    arr = make(tmp_path, data.shape, "int16")
    write_with_chunkio(tmp_path, arr, data)
    shard = tmp_path / "image" / "c" / "0" / "0" / "0"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ValueError, match="index checksum"):
        ShardedArrayReader(ShardedLayout.of(arr)).read((slice(0, 5),) * 3)
    shard.write_bytes(blob[:100] + blob[-(16 * 12 + 4) :])  # chunks cut, index kept
    with pytest.raises(ValueError, match="truncated"):
        ShardedArrayReader(ShardedLayout.of(arr)).read((slice(0, 40), slice(0, 30), slice(0, 20)))
