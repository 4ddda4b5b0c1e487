"""The NIfTI reader's gzip path (libdeflate guarded by ISA-L) on the gzip shapes found in the
wild: one member, several members, trailing bytes, truncation and corruption."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from medfm.ingest.readers.itk import _gunzip, read_nifti
from medfm.ingest.registry import UnreadableInput

DATA = os.urandom(3000) + bytes(200_000)


@pytest.mark.parametrize(
    "blob, want",
    [
        (gzip.compress(DATA), DATA),
        (gzip.compress(DATA[:1000]) + gzip.compress(DATA[1000:]), DATA),  # short first member
        (gzip.compress(DATA[:100_000]) + gzip.compress(DATA[:100_000][::-1]), None),  # same size
        (gzip.compress(DATA) + bytes(8), DATA),  # trailing zeros (gzip ignores them)
        (gzip.compress(b""), b""),
    ],
    ids=["one-member", "multi-member", "equal-size-members", "trailing-zeros", "empty"],
)
def test_gunzip_matches_gzip(blob, want):
    assert bytes(_gunzip(blob)) == (want if want is not None else gzip.decompress(blob))


@pytest.mark.parametrize("cut", [10, 1000])
def test_gunzip_fails_on_truncation(cut):
    with pytest.raises(EOFError):
        _gunzip(gzip.compress(DATA)[:-cut])


def test_gunzip_fails_on_corruption():
    blob = bytearray(gzip.compress(DATA))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(Exception):  # noqa: B017 - ISA-L raises zlib/gzip errors by type
        _gunzip(bytes(blob))


def test_multi_member_nifti_reads_every_voxel(tmp_path):
    arr = np.arange(24 * 20 * 7, dtype=np.int16).reshape(24, 20, 7)
    raw = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.9, 2.5, 1])), raw)
    data = raw.read_bytes()
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:]))
    vol = read_nifti(str(path), "image")
    assert np.array_equal(vol.array, arr) and vol.geometry.spacing == pytest.approx((0.8, 0.9, 2.5))
    path.write_bytes(gzip.compress(data)[:-100])
    with pytest.raises(UnreadableInput, match="truncated"):
        read_nifti(str(path), "image")


def test_one_member_file_takes_the_libdeflate_path():
    assert isinstance(_gunzip(gzip.compress(DATA)), bytearray)  # ISA-L would return bytes


def test_a_4d_nifti2_gives_one_volume_per_time_point(tmp_path):
    """ITK reads no NIfTI-2, so a 4D one (nibabel's example_nifti2) is split here: each time
    point's voxels and the affine's geometry (RAS -> LPS) as nibabel reads them; a 2D one
    becomes a 1-slice volume."""
    from medfm.shards import Geometry

    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "example_nifti2.nii.gz")
    ref = nib.load(path)
    vols = read_nifti(path, "image")
    assert len(vols) == ref.shape[3] == 2
    want = np.asanyarray(ref.dataobj)
    for t, vol in enumerate(vols):
        assert np.array_equal(vol.array, want[..., t])
        assert vol.geometry == Geometry.from_nifti_affine(ref.affine)
    flat = nib.Nifti2Image(want[:, :, 0, 0], ref.affine)
    nib.save(flat, tmp_path / "flat.nii")
    (one,) = read_nifti(str(tmp_path / "flat.nii"), "image")
    assert one.array.shape == (*want.shape[:2], 1) and np.array_equal(
        one.array[..., 0], want[:, :, 0, 0]
    )
