"""Score an exported model (folder or hub:// reference) on a split of a labeled shard set.

This is what a hub user runs after `medfm hub pull`: the model is loaded through
`medfm.finetune.load`, so its base encoder is hash-checked exactly as in deployment, and the
data, batch and bootstrap settings come from a fine-tuning config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import FinetuneConfig
from .data import Collate, loader, split_dataset
from .export import load
from .fit import predict
from .segment import evaluate_segmentation
from .tasks import SampleTask, task_for
from .tasks.segmentation import Segmentation


def evaluate_export(
    model_ref: str | Path,
    cfg: FinetuneConfig,
    split: str = "test",
    roc_png: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Metrics with bootstrap CIs (and `n`, the samples scored) of an export on `split`, at
    the decision threshold recorded in the export. Segmentation is scored per case (Dice, ...)
    and `roc_png` gets its overlays instead."""
    task = task_for(cfg.task)
    model = load(model_ref, device=device)
    if isinstance(task, Segmentation):
        return evaluate_segmentation(model, cfg, split, roc_png, device)
    if not isinstance(task, SampleTask):
        raise ValueError("evaluate_export scores classification, regression and segmentation")
    ds = split_dataset(cfg.data.shards, split, cfg, shuffle=False)
    batches = loader(ds, Collate(model.contract, task), cfg)
    outputs, targets, patients = predict(model, batches, torch.device(device))
    if not patients:
        raise ValueError(f"{cfg.data.shards}: no {split!r} samples to evaluate on")
    # The run's own threshold; exports before it (and tasks without one): 0.5.
    threshold = model.medfm.get("threshold")
    m = task.score(outputs, targets, patients, cfg.eval, threshold, roc_png)
    return m | {"n": len(patients)}
