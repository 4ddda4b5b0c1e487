"""The realized share of synthetic samples, for the training log.

Both engines already mix synthetic shards from their config (`synthetic: {shards, ratio}`):
pretrain through its weighted draw plan, finetune through `medfm.shards.MixedDataset`
(`finetune.data.with_synthetic`). What a run should also log is the share it actually trained
on: `RealizedRatio` counts it from each batch and checks it against a binomial tolerance.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SYNTHETIC = "synthetic"  # the MixedDataset source name of the synthetic shards


class RealizedRatio:
    """Share of synthetic samples delivered so far; `update` takes each collated batch."""

    def __init__(self, target: float):
        self.target, self.synthetic, self.total = target, 0, 0

    def update(self, batch: dict[str, Any]) -> float:
        """Count a batch by its `source` names (MixedDataset) or `synthetic` flags (pretrain)."""
        if "source" in batch:
            flags = [s == SYNTHETIC for s in batch["source"]]
        else:
            flags = [bool(f) for f in torch.as_tensor(batch["synthetic"]).flatten()]
        self.synthetic += sum(flags)
        self.total += len(flags)
        return self.ratio

    @property
    def ratio(self) -> float:
        return self.synthetic / self.total if self.total else 0.0

    def tolerance(self, z: float = 4.0) -> float:
        """z binomial standard errors of the ratio at the draws seen so far."""
        return z * math.sqrt(self.target * (1 - self.target) / max(self.total, 1))

    def within_tolerance(self, z: float = 4.0) -> bool:
        return abs(self.ratio - self.target) <= self.tolerance(z)

    def log(self) -> dict[str, torch.Tensor]:
        return {"data/synthetic_ratio": torch.tensor(self.ratio)}
