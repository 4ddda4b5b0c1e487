"""The preprocessing contract: how the tensors medfm.shards yields become model inputs.

It is recorded in the export sidecar, so that fine-tuning and synthesis feed an encoder exactly
what it was trained on. Crops draw from torch's RNG, which medfm.shards seeds per sample from
(seed, epoch, sample), so a resumed run crops the remaining samples as the original would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.shards.schema import EHR_AGE, EHR_TIME

CT_WINDOW = (-1000.0, 1000.0)  # HU, air to dense bone: the default for CT when intensity=auto


@dataclass
class Contract:
    """What an encoder expects; `describe()` goes into the sidecar."""

    kind: str
    intensity: str = "auto"
    window: tuple[float, float] | None = None
    channels: int = 0  # 2D: channels the encoder takes (0 = as stored)
    image_size: int = 0  # 2D: square side after resize
    patch_size: tuple[int, ...] = ()  # 3D: training patch in voxels
    signal_length: int = 0
    max_tokens: int = 0

    def describe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def apply(self, item: dict[str, Any]) -> dict[str, Any]:
        """Model-ready fields of one sample: fixed shapes, so default collation stacks them."""
        meta = item["meta"]
        x, modality = item["data"], meta["modality"]
        out: dict[str, Any] = {"key": item["key"], "synthetic": torch.tensor(meta["synthetic"])}
        if "label" in item:  # labels["class"], for class-conditional objectives
            out["label"] = item["label"]
        if self.kind == "image2d":
            out["data"] = self.image2d(x, meta["dtype"], modality)
        elif self.kind == "volume3d":
            out["data"] = self.intensity_of(x, modality, integer=False)
        elif self.kind == "signal":
            out["data"] = self.signal(x)
        else:
            out.update(self.ehr(x, item.get("extras", {}), meta))
        return out

    def intensity_of(self, x: torch.Tensor, modality: str, integer: bool) -> torch.Tensor:
        """auto: integer images are already in [0, 1], CT is HU-windowed, the rest z-scored."""
        mode, window = self.intensity, self.window
        if mode == "auto":
            mode = "unit" if integer else "window" if modality == "CT" else "zscore"
        if mode == "unit":
            return x
        if mode == "window":
            lo, hi = window or CT_WINDOW
            return (x.clamp(lo, hi) - lo) / (hi - lo)
        return (x - x.mean()) / (x.std() + 1e-6)

    def image2d(self, x: torch.Tensor, dtype: str, modality: str) -> torch.Tensor:
        integer = np.dtype(dtype).kind in "ui"
        x = self.intensity_of(x.float(), modality, integer)
        if self.channels and x.shape[0] != self.channels:
            x = (
                x.mean(0, keepdim=True)
                if self.channels == 1
                else x[:1].expand(self.channels, -1, -1)
            )
        if self.image_size and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]
        return x.contiguous()

    def signal(self, x: torch.Tensor) -> torch.Tensor:
        """(leads, T) -> (leads, signal_length), z-scored per window over all leads together:
        per-lead scaling would erase the relative lead amplitudes that carry the diagnosis
        (the ECG axis), and its zero-mean leads leave MAE nothing to learn at first."""
        a, b = random_window(x.shape[1], self.signal_length or x.shape[1])
        x = x[:, a:b].float()
        if self.intensity in ("auto", "zscore"):
            x = (x - x.mean()) / (x.std() + 1e-6)
        if self.signal_length and x.shape[1] < self.signal_length:
            x = F.pad(x, (0, self.signal_length - x.shape[1]))
        return x.contiguous()

    def ehr(self, tokens: torch.Tensor, extras: dict[str, Any], meta: dict) -> dict[str, Any]:
        """A random window of max_tokens codes, right-padded with 0, with the window's per-token
        times and ages when stored (the EHR extras of medfm.shards.schema), each padded with its
        last value; without stored ages, a per-sample `age` label."""
        n = self.max_tokens or len(tokens)
        a, b = random_window(len(tokens), n)
        out = {"data": F.pad(tokens[a:b].long(), (0, n - (b - a)))}
        for stored, key in ((EHR_TIME, "times"), (EHR_AGE, "age")):
            if stored in extras:
                v = torch.as_tensor(np.asarray(extras[stored], np.float32)[a:b])
                out[key] = F.pad(v, (0, n - (b - a)), value=float(v[-1]) if b > a else 0.0)
        age = meta["labels"].get("age", meta["meta"].get("age"))
        if "age" not in out and age is not None:
            out["age"] = torch.tensor(float(age))
        return out


def sorted_classes(values: set[Any]) -> list[Any]:
    """Class values in a stable order (ints before strings): the index order of class_index."""
    return sorted(values, key=lambda v: (isinstance(v, str), v))


def random_window(length: int, want: int) -> tuple[int, int]:
    """(start, stop) of a random crop from torch's RNG; everything when shorter than `want`."""
    if length <= want:
        return 0, length
    start = int(torch.randint(0, length - want + 1, (1,)))
    return start, start + want
