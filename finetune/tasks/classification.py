"""Single-label classification: binary (one logit, a decision threshold) and multiclass
(softmax over the labels table). Labels are class names or indices of `task.label_names`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.config import ConfigError

from ..metrics import MetricFns, choose_threshold
from .base import TASKS, Curve, SampleTask


class Classification(SampleTask):
    """One class per sample; the best epoch has the highest val AUROC."""

    few_shot = True

    def encode(self, value: Any, where: str) -> np.ndarray:
        return np.int64(self.class_index(value, where))

    def class_counts(self, targets: np.ndarray) -> np.ndarray:
        return np.bincount(targets, minlength=len(self.label_names))

    def class_members(self, targets: np.ndarray, c: int) -> np.ndarray:
        return np.flatnonzero(targets == c)


@TASKS.register("binary")
class Binary(Classification):
    num_outputs = 1

    def validate_labels(self) -> None:
        super().validate_labels()
        if len(self.label_names) != 2:
            raise ConfigError(
                f"task.label_names: binary tasks have 2 names, got {self.label_names}"
            )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs.reshape(-1))

    def metric_fns(self, threshold: float = 0.5) -> MetricFns:
        import torchmetrics.functional.classification as tmc

        t = {"threshold": threshold}

        def balanced(p, y):
            return 0.5 * (tmc.binary_recall(p, y, **t) + tmc.binary_specificity(p, y, **t))

        return {
            "auroc": tmc.binary_auroc,
            "accuracy": lambda p, y: tmc.binary_accuracy(p, y, **t),
            "balanced_accuracy": balanced,
            "f1": lambda p, y: tmc.binary_f1_score(p, y, **t),
            "sensitivity": lambda p, y: tmc.binary_recall(p, y, **t),
            "specificity": lambda p, y: tmc.binary_specificity(p, y, **t),
            "ece": lambda p, y: tmc.binary_calibration_error(p, y, n_bins=15),
            "brier": lambda p, y: ((p - y.float()) ** 2).mean(),
        }

    def decision_threshold(self, setting: float | str, val: Any) -> float:
        """A fixed probability, or one chosen on val with the best weights (eval.threshold)."""
        if isinstance(setting, str):
            outputs, targets = val()
            return choose_threshold(outputs, targets, setting)
        return setting

    def roc_curves(self, preds: torch.Tensor, targets: torch.Tensor) -> list[Curve]:
        return [(self.label_names[1], preds, targets)]


@TASKS.register("multiclass")
class Multiclass(Classification):
    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs, -1)

    def metric_fns(self, threshold: float = 0.5) -> MetricFns:
        import torchmetrics.functional.classification as tmc

        c = len(self.label_names)
        kw = {"num_classes": c, "average": "macro"}
        return {
            "auroc": lambda p, y: tmc.multiclass_auroc(p, y, **kw),
            "accuracy": lambda p, y: tmc.multiclass_accuracy(p, y, num_classes=c, average="micro"),
            "balanced_accuracy": lambda p, y: tmc.multiclass_recall(p, y, **kw),
            "f1": lambda p, y: tmc.multiclass_f1_score(p, y, **kw),
            "sensitivity": lambda p, y: tmc.multiclass_recall(p, y, **kw),
            "specificity": lambda p, y: tmc.multiclass_specificity(p, y, **kw),
            "ece": lambda p, y: tmc.multiclass_calibration_error(p, y, num_classes=c, n_bins=15),
            "brier": lambda p, y: ((p - F.one_hot(y, c).float()) ** 2).sum(1).mean(),
        }

    def roc_curves(self, preds: torch.Tensor, targets: torch.Tensor) -> list[Curve]:
        """One class against the rest, per class."""
        return [(n, preds[:, i], (targets == i).long()) for i, n in enumerate(self.label_names)]
