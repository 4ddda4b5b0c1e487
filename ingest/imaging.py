"""Shared image preprocessing: canonical orientation, resampling, label checks, intensity.

Volumes travel as `Volume`: voxels in the shard layout (I, J, K) = ITK index order, and their
LPS geometry. For axis-aligned scans (nearly all) reorientation is a NumPy view and linear or
nearest resampling runs in `medfm.ingest.resample`; B-spline and oblique scans go through
SimpleITK, which then owns the geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from medfm.shards import Geometry, Sample

from .registry import LabelMismatch, ReadContext
from .resample import Grid, axis_map, linear, nearest, source_index

# CT statistics histogram: 1 HU bins over the range scanners store.
HU_MIN, HU_MAX = -1024, 3072
GEOMETRY_TOL_MM = 1e-3
LABEL_TOL_VOXELS = 0.01


def geometry_of(img: sitk.Image) -> Geometry:
    return Geometry(
        spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(o) for o in img.GetOrigin()),
        direction=tuple(float(d) for d in img.GetDirection()),
    )


@dataclass
class Volume:
    """Voxels (I, J, K) and their geometry. `image` is the SimpleITK image `array` views (kept
    alive with it), or None when the voxels live elsewhere (a NIfTI's decompressed buffer)."""

    array: np.ndarray
    geometry: Geometry
    image: sitk.Image | None = None

    @classmethod
    def of(cls, img: sitk.Image) -> Volume:
        """No copy: SimpleITK's (K, J, I) buffer seen as (I, J, K). The view does not keep the
        image alive (SimpleITK's rule), so it is only read while this Volume lives."""
        return cls(sitk.GetArrayViewFromImage(img).transpose(2, 1, 0), geometry_of(img), img)

    @classmethod
    def owned(cls, img: sitk.Image) -> Volume:
        """A SimpleITK filter's result, copied out: it becomes the sample's data."""
        return cls(sitk.GetArrayFromImage(img).transpose(2, 1, 0), geometry_of(img))

    def sitk_image(self) -> sitk.Image:
        """For the SimpleITK paths: the image itself, or the voxels copied into one."""
        if self.image is not None:
            return self.image
        img = sitk.GetImageFromArray(self.array.transpose(2, 1, 0))
        img.SetSpacing(self.geometry.spacing)
        img.SetOrigin(self.geometry.origin)
        img.SetDirection(self.geometry.direction)
        return img


def as_volume(img: sitk.Image | Volume) -> Volume:
    return img if isinstance(img, Volume) else Volume.of(img)


def direction_matrix(geo: Geometry | Grid) -> np.ndarray:
    return np.asarray(geo.direction, float).reshape(3, 3)


def align_label(img: Volume, label: Volume) -> Volume:
    """The label map on the image's voxel grid, else LabelMismatch saying by how much it is off.

    Image and label are compared in physical space, not header field by header field: a label
    whose grid maps onto the image's by axis flips and permutations (a TotalSegmentator LAS
    segmentation of an LPS series) describes the same voxels, and nearest-neighbour resampling
    onto the image grid is then an exact permute/flip. A grid that is shifted, rotated or sized
    differently is refused, with the distance in mm.
    """
    a, b = img.geometry, label.geometry
    if img.array.shape == label.array.shape and all(
        np.allclose(x, y, atol=GEOMETRY_TOL_MM * (1 if what != "direction" else 1e-3))
        for what, x, y in (
            ("spacing", a.spacing, b.spacing),
            ("origin", a.origin, b.origin),
            ("direction", a.direction, b.direction),
        )
    ):
        return label  # the same grid: nothing to do
    cos = np.abs(direction_matrix(a).T @ direction_matrix(b))  # image axis x label axis
    perm = cos.argmax(axis=1)
    if len(set(perm.tolist())) != 3:
        raise LabelMismatch("label map axes are oblique to the image's (no axis correspondence)")
    if tuple(np.asarray(label.array.shape)[perm].tolist()) != img.array.shape:
        raise LabelMismatch(
            f"label map size {label.array.shape} != image size {img.array.shape} "
            "in any order of its axes"
        )
    off = float(_corner_distance_mm(img, label))
    tol = label_tolerance_mm(a)
    if off > tol:
        raise LabelMismatch(
            f"label map lies {off:.3g} mm away from the image in physical space "
            f"(its grid does not map onto the image's by axis flips/permutations; "
            f"tolerance {tol:.3g} mm)"
        )
    grid = Grid(img.array.shape, a.origin, a.spacing, a.direction)
    return resample_to(label, grid, "nearest", label=True)


def label_tolerance_mm(geo: Geometry) -> float:
    """How far a label grid may lie from its image's: 1 % of the finest voxel edge (headers
    round to float32), at least GEOMETRY_TOL_MM. Far below the half voxel at which nearest
    neighbour would pick another voxel."""
    return max(GEOMETRY_TOL_MM, LABEL_TOL_VOXELS * min(geo.spacing))


def _corner_centres(vol: Volume) -> np.ndarray:
    """World positions (8, 3) of the voxel centres at the corners of the grid."""
    geo = vol.geometry
    ends = [(0, n - 1) for n in vol.array.shape]
    idx = np.array([[i, j, k] for i in ends[0] for j in ends[1] for k in ends[2]], float)
    return np.asarray(geo.origin) + (idx * np.asarray(geo.spacing)) @ direction_matrix(geo).T


def _corner_distance_mm(img: Volume, label: Volume) -> float:
    """Largest distance from a label corner voxel centre to the nearest image corner one: zero
    exactly when the label grid is the image grid up to axis flips and permutations (sizes
    being equal in that axis order)."""
    a, b = _corner_centres(img), _corner_centres(label)
    return np.linalg.norm(b[:, None, :] - a[None, :, :], axis=2).min(axis=1).max()


def canonical_direction(orientation: str) -> np.ndarray:
    """3x3 direction matrix (columns = axis directions) of an ITK orientation code."""
    d = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation)
    return np.array(d).reshape(3, 3)


def reorient(vol: Volume, orientation: str) -> Volume:
    """Permute/flip onto the canonical axes, no interpolation (sitk.DICOMOrient's result)."""
    d, geo = direction_matrix(vol.geometry), vol.geometry
    perm = axis_map(d, canonical_direction(orientation))
    if perm is None:  # oblique: DICOMOrient picks the closest axes and keeps the obliquity
        return Volume.owned(sitk.DICOMOrient(vol.sitk_image(), orientation))
    axes = d[:, perm]
    flip = (canonical_direction(orientation) * axes).sum(axis=0) < 0
    view = vol.array.transpose(perm)[tuple(slice(None, None, -1 if f else 1) for f in flip)]
    spacing = np.asarray(geo.spacing)[perm]
    last = (np.asarray(view.shape) - 1) * spacing * flip  # a flipped axis starts at its far end
    return Volume(
        c_order_copy(view),  # always a copy: `view` may look into a SimpleITK buffer
        Geometry(tuple(spacing.tolist()), tuple((np.asarray(geo.origin) + axes @ last).tolist()),
                 tuple((axes * np.where(flip, -1, 1)).ravel().tolist())),
    )  # fmt: skip


COPY_BLOCK = 32  # voxels per edge: a block of source and destination stays in L1/L2 cache


def c_order_copy(view: np.ndarray) -> np.ndarray:
    """A C-ordered copy of a 3D view. A DICOM stack or a NIfTI file is (k, j, i) in memory,
    so onto (i, j, k) the copy is a full transpose: numpy copies it element by element along
    the destination's rows, each read a cache miss (1.1 s for 512x512x200 int16). Copied in
    32-voxel blocks instead, both sides of a block stay in cache: 3-4x faster."""
    if view.ndim != 3 or abs(view.strides[-1]) == view.itemsize:
        return np.array(view, order="C")  # rows already run along memory: a plain copy
    out = np.empty(view.shape, view.dtype)
    b = COPY_BLOCK
    for i, j, k in np.ndindex(*(-(-n // b) for n in view.shape)):
        box = (slice(i * b, i * b + b), slice(j * b, j * b + b), slice(k * b, k * b + b))
        out[box] = view[box]
    return out


def target_grid(vol: Volume, orientation: str, spacing: list[float]) -> Grid:
    """The canonical-axis grid at `spacing` covering the image's voxel-edge bounding box.

    Reorientation and resampling then happen in one interpolation pass over the original
    voxels (no permuted full-resolution copy first). The grid's voxel centres all lie inside
    that box, where ITK (and resample.py) clamp to the edge voxels: no fill value is needed.
    """
    d_out, geo = canonical_direction(orientation), vol.geometry
    d_in = direction_matrix(geo)
    sp_in, size_in = np.array(geo.spacing), np.array(vol.array.shape)
    edges = [(-0.5, n - 0.5) for n in size_in]  # voxel-edge index range per axis
    corners = np.array([[a, b, c] for a in edges[0] for b in edges[1] for c in edges[2]])
    world = np.array(geo.origin) + (corners * sp_in) @ d_in.T
    local = world @ d_out  # coordinates along the canonical axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    sp = np.array(spacing, float)
    size = np.maximum(1, np.round((hi - lo) / sp - 1e-6)).astype(int)
    origin = d_out @ (lo + sp / 2)
    return Grid(tuple(int(s) for s in size), tuple(float(o) for o in origin),
                tuple(float(s) for s in sp), tuple(float(v) for v in d_out.ravel()))  # fmt: skip


def resample_to(vol: Volume, grid: Grid, interp: str, label: bool) -> Volume:
    """Resample onto `grid`; nearest for labels, linear/B-spline for images. Axis-aligned
    linear and nearest run separably in NumPy, the rest through sitk.Resample."""
    perm = axis_map(direction_matrix(vol.geometry), direction_matrix(grid))
    if perm is not None and (label or interp != "bspline"):
        index = source_index(vol.geometry, grid, perm)
        arr = (nearest if label else linear)(vol.array, index, perm)
        return Volume(arr, Geometry(grid.spacing, grid.origin, grid.direction))
    if label:
        method = sitk.sitkNearestNeighbor
    else:
        method = sitk.sitkBSpline if interp == "bspline" else sitk.sitkLinear
    img = vol.sitk_image()
    fill = 0.0 if label else float(vol.array.min())  # air for CT
    out = sitk.Resample(img, list(grid.size), sitk.Transform(), method, grid.origin,
                        grid.spacing, grid.direction, fill, img.GetPixelID())  # fmt: skip
    return Volume.owned(out)


def ct_hu(arr: np.ndarray) -> np.ndarray:
    """HU as int16 when the values are integral (the raw storage default)."""
    if arr.dtype == np.int16:
        return arr
    if np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0):
        return np.clip(arr, -32768, 32767).astype(np.int16)
    return arr.astype(np.float32)


_INT16_OF_U16 = np.arange(65536, dtype=np.int64)
_INT16_OF_U16[32768:] -= 65536  # the int16 value of each uint16 bit pattern


def ct_histogram(arr: np.ndarray, label: np.ndarray | None, fg_hu: float) -> np.ndarray:
    """1-HU histogram of foreground voxels (label > 0 if given, else HU > fg_hu)."""
    arr = arr.ravel(order="K")  # memory order: no copy of the transposed (I, J, K) view
    if label is not None:
        label = label.ravel(order="K")
    by_label = label is not None and bool(label.any())
    if arr.dtype == np.int16:  # raw HU, the default: one count of all 65536 values, 3x faster
        fg = arr[label > 0] if by_label else arr
        counts = _count_uint16(fg.view(np.uint16))
        keep = slice(None) if by_label else _INT16_OF_U16 > fg_hu
        return _hu_bins(_INT16_OF_U16[keep], counts[keep])
    fg = arr[label > 0] if by_label else arr[arr > fg_hu]
    values = fg if np.issubdtype(fg.dtype, np.integer) else np.rint(fg)
    return _hu_bins(values.astype(np.int64), None)


HIST_STEP = 1 << 18  # voxels per bincount call: its int64 copy of them stays in cache


def _count_uint16(values: np.ndarray) -> np.ndarray:
    """np.bincount(values, minlength=65536), in slices: bincount first casts its input to
    int64, which for a 512x512x200 CT is a 420 MB temporary (twice the time of the count)."""
    counts = np.zeros(65536, np.int64)
    for start in range(0, values.size, HIST_STEP):
        counts += np.bincount(values[start : start + HIST_STEP], minlength=65536)
    return counts


def _hu_bins(values: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """Counts per HU in [HU_MIN, HU_MAX), values outside clipped into the end bins."""
    idx = np.clip(values, HU_MIN, HU_MAX - 1) - HU_MIN
    hist = np.bincount(idx, weights=counts, minlength=HU_MAX - HU_MIN)
    return hist.astype(np.int64)


def hist_stats(hist: np.ndarray, percentiles: list[float]) -> dict[str, float]:
    """Percentiles of a HU histogram, and mean/std of the values clipped to them."""
    n = int(hist.sum())
    if n == 0:
        return {}
    values = np.arange(HU_MIN, HU_MAX, dtype=np.float64)
    cdf = np.cumsum(hist) / n
    lo = float(values[np.searchsorted(cdf, percentiles[0] / 100.0)])
    hi = float(values[min(np.searchsorted(cdf, percentiles[1] / 100.0), len(values) - 1)])
    clipped = np.clip(values, lo, hi)
    mean = float((clipped * hist).sum() / n)
    std = float(np.sqrt(((clipped - mean) ** 2 * hist).sum() / n))
    return {"clip_low": lo, "clip_high": hi, "mean": mean, "std": max(std, 1e-6), "voxels": n}


def zscore_image(arr: np.ndarray, percentiles: list[float]) -> tuple[np.ndarray, dict[str, float]]:
    """Per-image percentile clip + z-score over non-zero voxels (MR convention)."""
    a = arr.astype(np.float32)
    fg = a[a != 0] if np.any(a != 0) else a.ravel()
    lo, hi = (float(v) for v in np.percentile(fg, percentiles))
    a = np.clip(a, lo, hi)
    fgc = np.clip(fg, lo, hi)
    mean, std = float(fgc.mean()), float(max(fgc.std(), 1e-6))
    return (a - mean) / std, {"clip_low": lo, "clip_high": hi, "mean": mean, "std": std}


def intensity(
    arr: np.ndarray, modality: str, ctx: ReadContext
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the spec's intensity rule for this modality; returns (array, what was done)."""
    spec = ctx.spec.intensity
    if modality == "CT":
        hu = ct_hu(arr)
        if spec.ct == "raw":
            return hu, {"mode": "raw", "unit": "HU"}
        st = ctx.stats.get(ctx.source.name, {}).get("ct")
        if not st:
            return hu, {"mode": "raw", "unit": "HU", "note": "no foreground statistics"}
        out = (np.clip(hu, st["clip_low"], st["clip_high"]) - st["mean"]) / st["std"]
        return out.astype(np.float32), {"mode": "zscore", "source": "dataset", **st}
    mode = spec.mr if modality == "MR" else spec.other
    if mode == "raw":
        return arr, {"mode": "raw"}
    out, st = zscore_image(arr, spec.percentiles)
    return out, {"mode": "zscore", "source": "image", **st}


def volume_sample(
    ctx: ReadContext,
    img: sitk.Image | Volume,
    label: sitk.Image | Volume | None,
    *,
    key: str,
    modality: str,
    patient_id: str,
    study_id: str = "",
    series_id: str = "",
    meta: dict[str, Any] | None = None,
) -> Sample:
    """Reorient + resample (image and label together), apply intensity, build the Sample."""
    img = as_volume(img)
    label = as_volume(label) if label is not None else None
    if label is not None:
        label = align_label(img, label)
    vspec = ctx.spec.volume
    if vspec.spacing is None:  # permute/flip only: no interpolation at all
        img = reorient(img, vspec.orientation)
        label = reorient(label, vspec.orientation) if label is not None else None
    else:
        grid = target_grid(img, vspec.orientation, vspec.spacing)
        img = resample_to(img, grid, vspec.interpolation, label=False)
        label = resample_to(label, grid, "nearest", label=True) if label is not None else None
    lab_arr = _label_dtype(label.array) if label is not None else None
    data, how = intensity(img.array, modality, ctx)
    meta = dict(meta or {})
    meta["intensity"] = how
    return Sample(
        key=key,
        kind="volume3d",
        modality=modality,
        dataset=ctx.source.name,
        patient_id=patient_id,
        split=ctx.split(patient_id),
        data=data,
        study_id=study_id,
        series_id=series_id,
        label_map=lab_arr,
        geometry=img.geometry,
        licence=ctx.source.licence,
        meta=meta,
    )


def _label_dtype(a: np.ndarray) -> np.ndarray:
    if a.size and (a.min() < 0 or a.max() > 65535):
        return a.astype(np.int32, copy=False)
    return a.astype(np.uint8 if (not a.size or a.max() < 256) else np.uint16, copy=False)


def fit_2d(arr: np.ndarray, size: list[int] | None, mode: str, label: bool = False) -> np.ndarray:
    """Resize (aspect kept) and/or centre-pad a 2D image to `size` = [H, W]."""
    if not size:
        return arr
    h, w = arr.shape[:2]
    th, tw = size
    if mode == "resize" and (h, w) != (th, tw):
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 3)
        img.SetSpacing((1.0, 1.0))
        out = sitk.Resample(
            img,
            [nw, nh],
            sitk.Transform(),
            sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
            (0.0, 0.0),
            (w / nw, h / nh),
        )
        arr = sitk.GetArrayFromImage(out).astype(arr.dtype)
        h, w = arr.shape[:2]
    if h > th or w > tw:  # pad mode never shrinks by resampling: centre-crop instead
        top, left = (h - th) // 2 if h > th else 0, (w - tw) // 2 if w > tw else 0
        arr = arr[top : top + min(h, th), left : left + min(w, tw)]
        h, w = arr.shape[:2]
    pad = [((th - h) // 2, th - h - (th - h) // 2), ((tw - w) // 2, tw - w - (tw - w) // 2)]
    pad += [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad) if any(p for pair in pad for p in pair) else arr
