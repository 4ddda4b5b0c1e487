"""Separable resampling onto a grid whose axes are the source's axes up to order and sign.

That is every canonical reorientation of an axis-aligned scan (nearly all CT and MR), and then
trilinear interpolation factorises into three 1-D passes and nearest neighbour into one gather.
Done one output slice at a time, only the two source slices a slice blends are read and the
temporaries stay in cache: on one thread 1.8x (512x512x300 CT) to 2.7x (256x256x120) faster
than sitk.Resample going to 1.5 mm, and the source is read where it lies (a NIfTI's
decompressed buffer, no copy into an ITK image). Sampling follows ITK's conventions: continuous
indices inside the voxel-edge box clamp to the edge voxels, linear results truncate towards zero
into integer types, nearest rounds half up. Linear runs in float32 (float64 for 32/64-bit
sources): within 1 of ITK's double-precision result where that lies on a truncation boundary,
identical elsewhere (tests/test_ingest_resample.py compares both on a real CT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfm.shards import Geometry

AXIS_TOL = 1e-6  # |cos| this close to 1 counts as the same axis: < 1 um of drift over 1 m


@dataclass(frozen=True)
class Grid:
    """A sampling grid in LPS mm, ITK conventions (origin = centre of voxel 0)."""

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]


def axis_map(direction: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """`perm` with target axis a = +-source axis perm[a] (3x3 direction matrices, columns =
    axes), or None when some source axis is oblique to the target axes."""
    cos = np.abs(target.T @ direction)  # cos[a, p] = |target axis a . source axis p|
    perm = cos.argmax(axis=1)
    if len(set(perm.tolist())) != 3 or np.abs(cos[np.arange(3), perm] - 1).max() > AXIS_TOL:
        return None
    return perm


def source_index(geo: Geometry, grid: Grid, perm: np.ndarray) -> list[np.ndarray]:
    """Per source axis p: the continuous source index of the grid's voxels along the target
    axis a with perm[a] == p (decreasing where the axis runs backwards, so no flip needed)."""
    d = np.asarray(geo.direction).reshape(3, 3)
    t = np.asarray(grid.direction).reshape(3, 3)
    offset = np.asarray(grid.origin) - np.asarray(geo.origin)
    index: list[np.ndarray] = [np.empty(0)] * 3
    for a, p in enumerate(perm):
        step = grid.spacing[a] * float(t[:, a] @ d[:, p])  # +-spacing along source axis p
        index[p] = (float(offset @ d[:, p]) + step * np.arange(grid.size[a])) / geo.spacing[p]
    return index


def _memory_order(arr: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """A C-contiguous view of `arr` (copy only if it has no contiguous layout) and its axes."""
    order = sorted(range(arr.ndim), key=lambda ax: -arr.strides[ax])
    return np.ascontiguousarray(arr.transpose(order)), order


def _taps(x: np.ndarray, n: int, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear taps (i0, i1, weight of i1) with ITK's clamping to the edge voxels."""
    x = np.clip(x, 0, n - 1)
    i0 = np.minimum(x.astype(np.intp), max(n - 2, 0))
    return i0, np.minimum(i0 + 1, n - 1), (x - i0).astype(dtype)


def linear(arr: np.ndarray, index: list[np.ndarray], perm: np.ndarray) -> np.ndarray:
    """Trilinear samples at `index` (source_index), C-contiguous in target axis order, dtype
    of `arr`. Blends the slowest memory axis first: each output slice reads two source slices."""
    m, order = _memory_order(arr)
    dtype = np.result_type(arr.dtype, np.float32).type
    (a0, b0, w0), (a1, b1, w1), (a2, b2, w2) = (
        _taps(index[p], m.shape[j], dtype) for j, p in enumerate(order)
    )
    w1 = w1[:, None]
    out = np.empty([len(index[p]) for p in perm], arr.dtype)
    target_axis = {int(p): a for a, p in enumerate(perm)}
    view = out.transpose([target_axis[p] for p in order])  # out, in memory axis order
    # Every pass is lo + (hi - lo) * w, like ITK, into buffers reused across slices; np.take
    # with out= gathers rows and columns about twice as fast as fancy indexing does.
    plane = np.empty(m.shape[1:], dtype)
    rows, rows_hi = np.empty((len(a1), m.shape[2]), dtype), np.empty((len(a1), m.shape[2]), dtype)
    cols, cols_hi = np.empty((len(a1), len(a2)), dtype), np.empty((len(a1), len(a2)), dtype)
    for k in range(len(a0)):
        lo = m[a0[k]]
        np.subtract(m[b0[k]], lo, out=plane, dtype=dtype)
        plane *= w0[k]
        plane += lo
        _blend(plane, a1, b1, w1, 0, rows, rows_hi)
        _blend(rows, a2, b2, w2, 1, cols, cols_hi)
        view[k] = cols  # float -> integer truncates towards zero, as ITK's cast does
    return out


def _blend(src, lo, hi, w, axis, out, scratch) -> None:
    """out = src[lo] + (src[hi] - src[lo]) * w along `axis`, in place."""
    np.take(src, lo, axis=axis, out=out)
    np.take(src, hi, axis=axis, out=scratch)
    scratch -= out
    scratch *= w
    out += scratch


def nearest(arr: np.ndarray, index: list[np.ndarray], perm: np.ndarray) -> np.ndarray:
    """Nearest-neighbour samples (label maps), C-contiguous in target axis order."""
    near = [
        np.clip(np.floor(x + 0.5), 0, n - 1).astype(np.intp)
        for x, n in zip(index, arr.shape, strict=True)
    ]
    return arr.transpose(perm)[np.ix_(*(near[p] for p in perm))]
