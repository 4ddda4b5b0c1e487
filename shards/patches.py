"""3D patches from Zarr volumes: uniform, foreground-weighted (nnU-Net style) and sliding grid.

A patch is read by slicing the Zarr arrays, so only the chunks that intersect it are fetched and
decoded (tests/test_readers_patches.py counts them). Foreground locations are computed once per
label map, lazily, and cached in memory and optionally on disk, keyed by the label's sha256.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.io import atomic_write_bytes, get_fs

from .manifest import Manifest
from .sampleio import VolumeReader, read_region

MODES = ("uniform", "foreground", "grid")
UNITS = ("voxel", "mm")
FOREGROUND_PER_CLASS = 10_000  # as nnU-Net: enough locations to centre patches on, small to keep


def grid_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis: step patch*(1-overlap), the last window flush with the end."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


class PatchSampler:
    """Draws patches of `patch_size` (voxels, or mm converted per volume) from a shard set."""

    def __init__(
        self,
        root: str,
        patch_size: Sequence[float] | float,
        *,
        units: str = "voxel",
        mode: str = "uniform",
        foreground_fraction: float = 0.33,
        overlap: float = 0.25,
        seed: int = 0,
        patches_per_volume: int = 1,
        output_shape: Sequence[int] | None = None,
        pad_value: float = 0.0,
        cache_dir: str | None = None,
        store_wrapper: Callable[[Any], Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        version: int | None = None,  # a version of a set grown by --append (default: newest)
    ):
        if mode not in MODES or units not in UNITS:
            raise ValueError(f"mode must be in {MODES} and units in {UNITS}")
        size = [patch_size] * 3 if np.isscalar(patch_size) else list(patch_size)
        if len(size) != 3 or min(size) <= 0:
            raise ValueError(f"patch_size must be 3 positive numbers, not {patch_size!r}")
        if not 0 <= foreground_fraction <= 1 or not 0 <= overlap < 1:
            raise ValueError("foreground_fraction must be in [0, 1] and overlap in [0, 1)")
        self.root, self.patch_size, self.units, self.mode = root, tuple(size), units, mode
        self.foreground_fraction, self.overlap, self.seed = foreground_fraction, overlap, seed
        self.patches_per_volume, self.pad_value = patches_per_volume, pad_value
        self.output_shape = tuple(output_shape) if output_shape else None
        self.cache_dir, self.store_wrapper, self.version = cache_dir, store_wrapper, version
        self.storage_options = storage_options or {}
        self._reader: VolumeReader | None = None
        self._foreground: dict[str, dict[int, np.ndarray]] = {}

    # --- geometry -------------------------------------------------------------------------
    def voxel_size(self, row: dict[str, Any]) -> tuple[int, int, int]:
        """The patch size in voxels for this volume (mm sizes divided by its spacing)."""
        if self.units == "voxel":
            return tuple(int(s) for s in self.patch_size)
        spacing = row["spacing"]
        return tuple(
            max(1, round(mm / sp)) for mm, sp in zip(self.patch_size, spacing, strict=True)
        )

    def windows(self, row: dict[str, Any]) -> list[tuple[int, int, int]]:
        """Sliding-window starts covering the whole volume (grid mode)."""
        size = self.voxel_size(row)
        axes = [grid_starts(s, p, self.overlap) for s, p in zip(row["shape"], size, strict=True)]
        return [(i, j, k) for i in axes[0] for j in axes[1] for k in axes[2]]

    def units_for(self, row: dict[str, Any]) -> int:
        """Patches one epoch draws from this volume."""
        return len(self.windows(row)) if self.mode == "grid" else self.patches_per_volume

    # --- reading --------------------------------------------------------------------------
    def reader(self) -> VolumeReader:
        if self._reader is None:
            m = Manifest.open(self.root, version=self.version, **self.storage_options)
            files = frozenset(f for f in m.header["files"] if f.startswith("volumes.zarr/"))
            self._reader = VolumeReader(m.fs, m.path, files, self.store_wrapper)
        return self._reader

    def patch(
        self, row: dict[str, Any], sub: int, rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        """Patch `sub` of a volume: window `sub` in grid mode, else a random draw from `rng`."""
        vol = self.reader().open(row)
        size = self.voxel_size(row)
        if self.mode == "grid":
            start = self.windows(row)[sub]
        else:
            rng = rng if rng is not None else np.random.default_rng(self.seed)
            centre = None
            if self.mode == "foreground" and vol.label is not None:
                if rng.random() < self.foreground_fraction:
                    centre = self._foreground_centre(row, vol.label, rng)
            start = self._start(row["shape"], size, centre, rng)
        region = tuple(slice(s, s + p) for s, p in zip(start, size, strict=True))
        image = self._pad(read_region(vol.image, row["shard"], region), size, self.pad_value)
        out = {"image": image, "start": start, "size": size}
        if vol.label is not None:
            out["label"] = self._pad(read_region(vol.label, row["shard"], region), size, 0)
        if self.output_shape and tuple(size) != self.output_shape:
            out = self._resize(out)
        return out

    def _start(self, shape, size, centre, rng) -> tuple[int, int, int]:
        hi = [max(0, s - p) for s, p in zip(shape, size, strict=True)]
        if centre is None:
            return tuple(int(rng.integers(0, h + 1)) for h in hi)
        return tuple(
            int(min(max(c - p // 2, 0), h)) for c, p, h in zip(centre, size, hi, strict=True)
        )

    @staticmethod
    def _pad(a: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
        if tuple(a.shape) == tuple(size):
            return a
        widths = [(0, p - s) for s, p in zip(a.shape, size, strict=True)]
        return np.pad(a, widths, constant_values=value)

    def _resize(self, out: dict[str, Any]) -> dict[str, Any]:
        """mm patches differ in voxels between volumes; resample to `output_shape` to batch."""
        img = torch.from_numpy(out["image"].astype(np.float32))[None, None]
        out["image"] = F.interpolate(img, self.output_shape, mode="trilinear")[0, 0].numpy()
        if "label" in out:
            lab = torch.from_numpy(out["label"].astype(np.float32))[None, None]
            lab = F.interpolate(lab, self.output_shape, mode="nearest")[0, 0]
            out["label"] = lab.numpy().astype(out["label"].dtype)
        return out

    # --- foreground -----------------------------------------------------------------------
    def _foreground_centre(self, row, label, rng) -> tuple[int, int, int] | None:
        """nnU-Net's rule: pick a present class uniformly, then one of its voxels."""
        locs = self.foreground(row, label)
        if not locs:
            return None
        cls = sorted(locs)[int(rng.integers(len(locs)))]
        return tuple(int(v) for v in locs[cls][int(rng.integers(len(locs[cls])))])

    def foreground(self, row: dict[str, Any], label: Any) -> dict[int, np.ndarray]:
        """Up to FOREGROUND_PER_CLASS voxel locations per label class (computed once, cached)."""
        sha = json.loads(row["members"])["label"]["sha256"]
        if sha in self._foreground:
            return self._foreground[sha]
        path = f"{self.cache_dir}/{sha}.npz" if self.cache_dir else None
        if path and os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                locs = {int(k[1:]): z[k] for k in z.files}
        else:
            locs = self._compute_foreground(read_region(label, row["shard"], ...), sha)
            if path:
                self._save_foreground(path, locs)
        self._foreground[sha] = locs
        return locs

    @staticmethod
    def _compute_foreground(lab: np.ndarray, sha: str) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(int(sha[:16], 16))
        locs = {}
        for cls in np.unique(lab):
            if cls == 0:
                continue
            where = np.argwhere(lab == cls).astype(np.int32)
            if len(where) > FOREGROUND_PER_CLASS:
                where = where[np.sort(rng.choice(len(where), FOREGROUND_PER_CLASS, replace=False))]
            locs[int(cls)] = where
        return locs

    def _save_foreground(self, path: str, locs: dict[int, np.ndarray]) -> None:
        fs, p = get_fs(path)
        buf = io.BytesIO()
        np.savez(buf, **{f"c{k}": v for k, v in locs.items()})
        atomic_write_bytes(fs, p, buf.getvalue())

    # --- standalone use -------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every patch of every volume in key order (grid mode: inference over whole volumes)."""
        m = Manifest.open(self.root, version=self.version, **self.storage_options)
        for row in m.rows():
            if row["storage"] != "zarr":
                continue
            for sub in range(self.units_for(row)):
                rng = np.random.default_rng([self.seed, sub, int(row["sha256"][:12], 16)])
                yield {"key": row["key"], **self.patch(row, sub, rng)}
