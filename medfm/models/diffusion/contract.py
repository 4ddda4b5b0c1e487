"""What a diffusion model is trained on: its preprocessing contract and its shard datasets.

The contract records how stored values map to [0, 1] (an intensity window, as the engine's
`unit` and `window` modes do), plus the storage facts (kind, modality, shape, dtype, spacing,
channels) of the training shards. Generation applies its inverse, so synthetic shards are stored
exactly as the real ones are and the same readers and transforms consume both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfm.models.contract import CT_WINDOW

DTYPE_RANGES = {"|u1": (0.0, 255.0), "<u2": (0.0, 65535.0)}


@dataclass(frozen=True)
class Intensity:
    """Linear window [low, high] -> [0, 1]; values outside are clipped."""

    low: float
    high: float

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = (x.astype(np.float32) - self.low) / (self.high - self.low)
        return np.clip(y, 0.0, 1.0)

    def inverse(self, y: np.ndarray, dtype: str) -> np.ndarray:
        """Model space back to the stored dtype, rounding for integer types."""
        x = np.clip(y, 0.0, 1.0) * (self.high - self.low) + self.low
        dt = np.dtype(dtype)
        if dt.kind in "iu":
            info = np.iinfo(dt)
            x = np.clip(np.rint(x), info.min, info.max)
        return x.astype(dt)


def default_intensity(dtype: str, window: tuple[float, float] | None) -> Intensity:
    if window is not None:
        if window[1] <= window[0]:
            raise ValueError(f"intensity window {list(window)}: high must exceed low")
        return Intensity(float(window[0]), float(window[1]))
    if dtype in DTYPE_RANGES:
        return Intensity(*DTYPE_RANGES[dtype])
    raise ValueError(
        f"stored dtype {dtype} has no natural range: set an intensity window (e.g. CT HU "
        "[-1000, 1000]) in the diffusion data config"
    )


def engine_window(data: dict[str, Any], rows: list[dict[str, Any]], root: str):
    """The window the engine's intensity setting (`auto`/`unit`/`window`) applied, or None for
    the dtype's range; z-scoring is refused (see intensity_of)."""
    mode = data.get("intensity", "auto")
    dtype = unique(rows, "dtype", root) if rows else ""
    if mode == "window" or (mode == "auto" and dtype not in DTYPE_RANGES):
        modality = unique(rows, "modality", root, required=False)
        if mode == "auto" and modality != "CT":
            mode = "zscore"
        else:
            return tuple(data.get("window") or CT_WINDOW)
    if mode == "zscore":
        raise ValueError(
            f"{root}: the run z-scored its inputs, which cannot be mapped back to stored values; "
            "train diffusion with data.intensity: window (or unit for 8/16-bit images)"
        )
    return None


def intensity_of(contract: dict[str, Any]) -> Intensity:
    """The contract's intensity map; refuses contracts that cannot be inverted to stored values."""
    spec = contract.get("intensity", {})
    if spec.get("mode") != "window":
        raise ValueError(
            f"intensity {spec} cannot be mapped back to stored values (z-scoring loses the "
            "scale); train diffusion models with a window or the dtype's range"
        )
    return Intensity(float(spec["low"]), float(spec["high"]))


def unique(rows: list[dict[str, Any]], col: str, root: str, required: bool = True) -> Any:
    values = {json.dumps(r[col]) for r in rows}
    if len(values) > 1 and required:
        shown = sorted(values)[:4]
        raise ValueError(
            f"{root}: training rows differ in {col} ({', '.join(shown)}...); diffusion training "
            f"needs one {col}; filter the shards (dataset/modality) or resample them at ingest"
        )
    return json.loads(values.pop()) if len(values) == 1 else None


def build_contract(
    root: str,
    rows: list[dict[str, Any]],
    header: dict[str, Any],
    sample_size: tuple[int, ...],
    window: tuple[float, float] | None,
) -> dict[str, Any]:
    """The preprocessing contract of the training rows (all of one kind, modality and dtype)."""
    if not rows:
        raise ValueError(f"{root}: no training rows match the selection")
    kind = unique(rows, "kind", root)
    if kind not in ("image2d", "volume3d"):
        raise ValueError(f"{root}: diffusion models train on image2d or volume3d, not {kind}")
    dtype = unique(rows, "dtype", root)
    shape = unique(rows, "shape", root) if kind == "image2d" else list(sample_size)
    intensity = default_intensity(dtype, window)
    return {
        "kind": kind,
        "modality": unique(rows, "modality", root),
        "dataset": unique(rows, "dataset", root, required=False) or "mixed",
        "shape": shape,
        "dtype": dtype,
        "spacing": unique(rows, "spacing", root, required=False) or [],
        "channels": unique(rows, "channels", root, required=False) or [],
        "intensity": {"mode": "window", "low": intensity.low, "high": intensity.high},
        "declared": header.get("attributes", {}).get("preprocessing", {}),
    }
