"""Device selection: the one place that decides between a GPU and the CPU."""

from __future__ import annotations

import torch


def has_gpu() -> bool:
    """Whether a CUDA device is usable here (also what pinned host memory is worth)."""
    return torch.cuda.is_available()


def select_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks the GPU when there is one, else the CPU; any other name is taken as is."""
    if str(name) == "auto":
        return torch.device("cuda" if has_gpu() else "cpu")
    return torch.device(name)
