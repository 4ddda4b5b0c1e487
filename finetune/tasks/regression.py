"""Regression: one float per sample (`labels[label_key]`), no labels table."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import MetricFns
from .base import TASKS, SampleTask


@TASKS.register("regression")
class Regression(SampleTask):
    """Mean squared error; the best epoch has the lowest val MAE."""

    pipeline_tag = "tabular-regression"
    needs_label_table = False
    num_outputs = 1

    def encode(self, value: Any, where: str) -> np.ndarray:
        return np.float32(value)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.reshape(-1), targets.float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.reshape(-1)

    def metric_fns(self, threshold: float = 0.5) -> MetricFns:
        import torchmetrics.functional as tmf

        return {
            "mae": tmf.mean_absolute_error,
            "rmse": lambda p, y: tmf.mean_squared_error(p, y, squared=False),
            "r2": tmf.r2_score,
            "pearson": tmf.pearson_corrcoef,
        }

    def selection_score(self, metrics: dict[str, dict[str, float]]) -> float:
        return -metrics["mae"]["value"]
