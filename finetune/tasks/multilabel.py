"""Multi-label classification: any subset of the labels table per sample, one sigmoid each.
A sample's label is a list of names or indices, or a {name: 0/1} mapping."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import MetricFns
from .base import TASKS, Curve, SampleTask


@TASKS.register("multilabel")
class Multilabel(SampleTask):
    """Multi-hot targets; few-shot draws k positives per label; best epoch by val AUROC."""

    few_shot = True

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def encode(self, value: Any, where: str) -> np.ndarray:
        # Integer 0/1: torchmetrics' multilabel metrics refuse float targets (every metric,
        # and so the val score, came out NaN with float32 multi-hot vectors).
        hot = np.zeros(len(self.label_names), np.int64)
        items = [k for k, on in value.items() if on] if isinstance(value, dict) else value
        for v in items if isinstance(items, (list, tuple)) else [items]:
            hot[self.class_index(v, where)] = 1
        return hot

    def class_counts(self, targets: np.ndarray) -> np.ndarray:
        return targets.sum(0)

    def class_members(self, targets: np.ndarray, c: int) -> np.ndarray:
        return np.flatnonzero(targets[:, c] > 0)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs)

    def metric_fns(self, threshold: float = 0.5) -> MetricFns:
        import torchmetrics.functional.classification as tmc

        c = len(self.label_names)
        kw = {"num_labels": c, "average": "macro"}

        def ece(p, y):
            return torch.stack(
                [tmc.binary_calibration_error(p[:, i], y[:, i], n_bins=15) for i in range(c)]
            ).mean()

        return {
            "auroc": lambda p, y: tmc.multilabel_auroc(p, y, **kw),
            "accuracy": lambda p, y: tmc.multilabel_accuracy(p, y, **kw),
            "balanced_accuracy": lambda p, y: (
                0.5 * (tmc.multilabel_recall(p, y, **kw) + tmc.multilabel_specificity(p, y, **kw))
            ),
            "f1": lambda p, y: tmc.multilabel_f1_score(p, y, **kw),
            "sensitivity": lambda p, y: tmc.multilabel_recall(p, y, **kw),
            "specificity": lambda p, y: tmc.multilabel_specificity(p, y, **kw),
            "ece": ece,
            "brier": lambda p, y: ((p - y.float()) ** 2).mean(),
        }

    def roc_curves(self, preds: torch.Tensor, targets: torch.Tensor) -> list[Curve]:
        return [(n, preds[:, i], targets[:, i].long()) for i, n in enumerate(self.label_names)]
