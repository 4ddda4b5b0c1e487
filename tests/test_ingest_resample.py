"""The separable resampler (ingest/resample.py) and NumPy reorientation against SimpleITK on the
same grids: a real CT and label map, and synthetic volumes with permuted and flipped axes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from medfm.ingest import imaging
from medfm.ingest.imaging import Volume, as_volume, reorient, resample_to, target_grid
from medfm.ingest.resample import Grid, axis_map, source_index
from medfm.shards import Geometry


def itk(img: sitk.Image, grid: Grid, method: int, fill: float) -> np.ndarray:
    out = sitk.Resample(img, list(grid.size), sitk.Transform(), method, grid.origin,
                        grid.spacing, grid.direction, fill, img.GetPixelID())  # fmt: skip
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def ours(img: sitk.Image, grid: Grid, label: bool, monkeypatch) -> Volume:
    """resample_to with sitk.Resample made to fail: proves the NumPy path ran."""
    with monkeypatch.context() as m:
        m.setattr(imaging.sitk, "Resample", lambda *a: pytest.fail("fell back to sitk.Resample"))
        return resample_to(as_volume(img), grid, "linear", label=label)


def off_boundary(src: sitk.Image, grid: Grid, fill: float) -> np.ndarray:
    """Grid voxels whose exact (double) linear value is not within 1e-3 of an integer: only
    there is truncation into an integer type well defined (ITK's own double rounding decides
    11.999... vs 12.000... at the others, and our float32 may decide differently)."""
    exact = itk(sitk.Cast(src, sitk.sitkFloat64), grid, sitk.sitkLinear, fill)
    return np.abs(exact - np.round(exact)) > 1e-3


def ties(img: sitk.Image, grid: Grid) -> np.ndarray:
    """Grid voxels whose source index is exactly half-way between two voxels along some axis:
    there nearest neighbour is a coin toss, which ITK decides by its floating-point noise."""
    vol = as_volume(img)
    perm = axis_map(imaging.direction_matrix(vol.geometry), imaging.direction_matrix(grid))
    assert perm is not None
    half = [np.abs(np.mod(x, 1) - 0.5) < 1e-6 for x in source_index(vol.geometry, grid, perm)]
    a, b, c = (half[p] for p in perm)
    return a[:, None, None] | b[None, :, None] | c[None, None, :]


def owns_memory(a: np.ndarray) -> bool:
    """False when `a` views memory nothing keeps alive: SimpleITK's array views rest on a
    memoryview without an owner (`obj` None); a NIfTI buffer's rests on its bytearray's."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return not isinstance(a.base, memoryview) or a.base.obj is not None


def synthetic(dtype, shape=(23, 17, 11), seed=0) -> sitk.Image:
    """Random voxels on an axis-permuted, flipped grid with uneven spacing."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1024, 2000, size=shape[::-1]).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 2.9))
    img.SetOrigin((-12.5, 40.25, 7.0))
    img.SetDirection((0, 0, -1, -1, 0, 0, 0, 1, 0))  # axes along -y, +z, -x
    return img


@pytest.fixture(scope="module")
def ts(sample_data):
    return sample_data / "totalsegmentator"


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SAR"])
@pytest.mark.parametrize("spacing", [[1.5, 1.5, 1.5], [4.0, 2.2, 5.0]])
def test_linear_matches_sitk_on_real_ct(ts, orientation, spacing, monkeypatch):
    src = sitk.DICOMOrient(sitk.ReadImage(str(ts / "example_ct_sm.nii.gz")), orientation)
    grid = target_grid(as_volume(src), "LPS", spacing)
    ref = itk(src, grid, sitk.sitkLinear, float(sitk.GetArrayViewFromImage(src).min()))
    got = ours(src, grid, False, monkeypatch)
    assert got.array.dtype == ref.dtype == np.int16 and got.array.flags.c_contiguous
    assert got.geometry == Geometry(grid.spacing, grid.origin, grid.direction)
    well_defined = off_boundary(src, grid, float(sitk.GetArrayViewFromImage(src).min()))
    assert np.array_equal(got.array[well_defined], ref[well_defined])
    assert np.abs(got.array.astype(np.int32) - ref).max() <= 1


@pytest.mark.parametrize("spacing", [[1.5, 1.5, 1.5], [2.0, 1.0, 3.7]])
def test_nearest_labels_match_sitk_except_exact_ties(ts, spacing, monkeypatch):
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    grid = target_grid(as_volume(seg), "LPS", spacing)
    ref = itk(seg, grid, sitk.sitkNearestNeighbor, 0.0)
    got = ours(seg, grid, True, monkeypatch).array
    tie = ties(seg, grid)
    assert got.dtype == ref.dtype and np.array_equal(got[~tie], ref[~tie])
    assert set(np.unique(got)) <= set(np.unique(sitk.GetArrayViewFromImage(seg)))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("spacing", [[1.0, 1.0, 1.0], [2.5, 0.6, 4.0]])
def test_synthetic_permuted_flipped_grid(dtype, spacing, monkeypatch):
    src = synthetic(dtype)
    grid = target_grid(as_volume(src), "LPS", spacing)
    ref = itk(src, grid, sitk.sitkLinear, 0.0)
    got = ours(src, grid, False, monkeypatch).array
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == np.float32:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    else:
        well_defined = off_boundary(src, grid, 0.0)
        assert np.array_equal(got[well_defined], ref[well_defined])
        assert np.abs(got.astype(np.int32) - ref).max() <= 1
    lab = ours(src, grid, True, monkeypatch).array
    tie = ties(src, grid)
    assert np.array_equal(lab[~tie], itk(src, grid, sitk.sitkNearestNeighbor, 0.0)[~tie])


def test_single_slice_volume(monkeypatch):
    src = synthetic(np.int16, shape=(30, 20, 1))
    grid = target_grid(as_volume(src), "LPS", [1.0, 1.0, 1.0])
    got = ours(src, grid, False, monkeypatch).array
    well_defined = off_boundary(src, grid, 0.0)
    assert np.array_equal(got[well_defined], itk(src, grid, sitk.sitkLinear, 0.0)[well_defined])


def test_oblique_and_bspline_go_through_sitk():
    src = synthetic(np.int16)
    tilt = sitk.VersorTransform((0, 0, 1), np.deg2rad(10)).GetMatrix()
    src.SetDirection(tuple((np.array(tilt).reshape(3, 3) @ np.eye(3)).ravel()))
    vol = as_volume(src)
    assert axis_map(imaging.direction_matrix(vol.geometry), np.eye(3)) is None
    grid = target_grid(vol, "LPS", [1.5, 1.5, 1.5])
    fill = float(sitk.GetArrayViewFromImage(src).min())
    assert np.array_equal(resample_to(vol, grid, "linear", False).array,
                          itk(src, grid, sitk.sitkLinear, fill))  # fmt: skip
    straight = synthetic(np.int16)
    grid = target_grid(as_volume(straight), "LPS", [1.5, 1.5, 1.5])
    fill = float(sitk.GetArrayViewFromImage(straight).min())
    bspline = resample_to(as_volume(straight), grid, "bspline", False)
    assert np.array_equal(bspline.array, itk(straight, grid, sitk.sitkBSpline, fill))
    # SimpleITK results become sample data: they must not view a buffer freed with its image
    oblique = reorient(vol, "LPS")
    assert all(owns_memory(v.array) for v in (bspline, oblique))


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SLP", "AIR"])
def test_reorient_equals_dicomorient(orientation):
    for src in (synthetic(np.int16), synthetic(np.float32, shape=(5, 9, 13), seed=1)):
        got, ref = reorient(as_volume(src), orientation), sitk.DICOMOrient(src, orientation)
        assert np.array_equal(got.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
        assert got.array.flags.c_contiguous and owns_memory(got.array)
        for a, b in ((got.geometry.spacing, ref.GetSpacing()),
                     (got.geometry.origin, ref.GetOrigin()),
                     (got.geometry.direction, ref.GetDirection())):  # fmt: skip
            np.testing.assert_allclose(a, b, atol=1e-9)


def test_blocked_copy_equals_numpy_for_every_axis_order_and_flip():
    """c_order_copy (32-voxel blocks) on views of a stack larger than one block and not a
    multiple of it, in every permutation, flipped or not: numpy's own copy, C-ordered."""
    stack = np.random.default_rng(0).integers(-1024, 3000, (70, 45, 33), dtype=np.int16)
    for perm in itertools.permutations(range(3)):
        for flip in (slice(None), slice(None, None, -1)):
            view = stack.transpose(perm)[flip, :, flip]
            got = imaging.c_order_copy(view)
            assert got.flags.c_contiguous and owns_memory(got)
            assert np.array_equal(got, view) and not np.shares_memory(got, stack)


def test_volume_from_array_round_trips_to_sitk():
    src = synthetic(np.int16)
    vol = as_volume(src)
    copy = Volume(np.array(vol.array), vol.geometry).sitk_image()
    assert np.array_equal(sitk.GetArrayFromImage(copy), sitk.GetArrayFromImage(src))
    assert copy.GetDirection() == src.GetDirection() and copy.GetOrigin() == src.GetOrigin()


@pytest.mark.parametrize("step", [imaging.HIST_STEP, 4099])  # 4099: many uneven slices
def test_hu_histogram_counts_every_foreground_voxel_once(ts, monkeypatch, step):
    """The int16 fast path (a bincount over all 65536 values, slice by slice) against a plain
    per-voxel count, on the real CT and its label map, in memory and transposed order, and on
    floats."""
    monkeypatch.setattr(imaging, "HIST_STEP", step)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))).astype(np.int16)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg.nii.gz")))

    def plain(arr, label, fg_hu):
        arr = arr.ravel()
        fg = arr[label.ravel() > 0] if label is not None else arr[arr > fg_hu]
        idx = np.clip(np.rint(fg).astype(np.int64), imaging.HU_MIN, imaging.HU_MAX - 1)
        return np.bincount(idx - imaging.HU_MIN, minlength=imaging.HU_MAX - imaging.HU_MIN)

    for arr, label in [(ct, None), (ct, seg), (ct.T, None), (ct.T, seg.T),
                       (ct.astype(np.float32) + 0.2, None)]:  # fmt: skip
        got = imaging.ct_histogram(arr, label, -500.0)
        assert got.dtype == np.int64 and np.array_equal(got, plain(arr, label, -500.0))
    assert imaging.ct_histogram(ct, None, -500.0).sum() == int((ct > -500).sum())
