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
from .metrics import score_split
from .train import predict


def evaluate_export(
    model_ref: str | Path,
    cfg: FinetuneConfig,
    split: str = "test",
    roc_png: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Metrics with bootstrap CIs (and `n`, the samples scored) of an export on `split`, at
    the decision threshold recorded in the export."""
    if cfg.task.type == "segmentation":
        raise ValueError("evaluate_export scores classification and regression exports")
    model = load(model_ref, device=device)
    ds = split_dataset(cfg.data.shards, split, cfg, shuffle=False)
    batches = loader(ds, Collate(model.contract, cfg.task), cfg)
    outputs, targets, patients = predict(model, batches, torch.device(device))
    if not patients:
        raise ValueError(f"{cfg.data.shards}: no {split!r} samples to evaluate on")
    threshold = model.medfm.get("threshold")  # the run's own; exports before it: 0.5
    threshold = 0.5 if threshold is None else threshold
    m = score_split(cfg.task, outputs, targets, patients, cfg.eval, threshold, roc_png)
    return m | {"n": len(patients)}
