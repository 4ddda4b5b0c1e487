"""Evaluation with patient-level bootstrap confidence intervals.

Each task's point estimates come from its own metric functions (torchmetrics, in
finetune/tasks/) or from monai.metrics (segmentation, here). The interval resamples *patients*
with replacement, not images: images of one patient are correlated, and resampling them
independently would give falsely narrow intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medfm.io import save_figure

MetricFns = dict[str, Callable[[torch.Tensor, torch.Tensor], float]]


def _group_by_patient(patients: list[str]) -> list[np.ndarray]:
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def _value(fn: Callable, p: torch.Tensor, y: torch.Tensor) -> float:
    try:
        v = float(fn(p, y))
    except (ValueError, RuntimeError):
        return float("nan")
    return v


def bootstrap(
    fns: MetricFns,
    preds: torch.Tensor,
    targets: torch.Tensor,
    patients: list[str],
    n_boot: int,
    ci: float,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Point estimate and patient-level bootstrap CI of every metric in `fns`."""
    groups = _group_by_patient(patients)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        idx = torch.from_numpy(np.concatenate([groups[g] for g in pick]))
        for name, fn in fns.items():
            draws[name].append(_value(fn, preds[idx], targets[idx]))
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for name, fn in fns.items():
        vals = np.asarray(draws[name])
        vals = vals[np.isfinite(vals)]  # replicates where a metric is undefined (one class)
        out[name] = {
            "value": _value(fn, preds, targets),
            "ci_low": float(np.percentile(vals, lo_q)) if len(vals) else float("nan"),
            "ci_high": float(np.percentile(vals, hi_q)) if len(vals) else float("nan"),
            "n_boot": int(len(vals)),
        }
    return out


def choose_threshold(outputs: torch.Tensor, targets: torch.Tensor, rule: str) -> float:
    """Binary decision threshold on (val) outputs: the probability that maximises Youden's J
    (sensitivity + specificity - 1) or accuracy; candidates are midpoints between scores."""
    p = torch.sigmoid(outputs.reshape(-1).double()).numpy()
    y = targets.reshape(-1).numpy().astype(bool)
    s = np.unique(p)
    cands = np.concatenate([[0.0], (s[1:] + s[:-1]) / 2, [1.0]]) if len(s) > 1 else np.array([0.5])
    pos = p[None, :] >= cands[:, None]
    sens, spec = (pos & y).sum(1) / max(y.sum(), 1), (~pos & ~y).sum(1) / max((~y).sum(), 1)
    score = sens + spec if rule == "val_youden" else (pos == y).mean(1)
    return float(cands[int(np.argmax(score))])


def segmentation_case_metrics(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: tuple[float, ...],
    tolerance_mm: float,
) -> dict[str, np.ndarray]:
    """Per-class Dice, IoU, HD95 (mm) and NSD of one case; classes exclude background."""
    from monai.metrics import (
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    p = torch.nn.functional.one_hot(pred.long(), num_classes).movedim(-1, 0)[None].float()
    y = torch.nn.functional.one_hot(label.long(), num_classes).movedim(-1, 0)[None].float()
    spacing = [float(s) for s in spacing]
    return {
        "dice": compute_dice(p, y, include_background=False, ignore_empty=True)[0].numpy(),
        "iou": compute_iou(p, y, include_background=False, ignore_empty=True)[0].numpy(),
        "hd95": compute_hausdorff_distance(
            p, y, include_background=False, percentile=95, spacing=spacing
        )[0].numpy(),
        "nsd": compute_surface_dice(
            p,
            y,
            class_thresholds=[tolerance_mm] * (num_classes - 1),
            include_background=False,
            spacing=spacing,
        )[0].numpy(),
    }


def segmentation_metrics(
    cases: list[dict[str, np.ndarray]],
    patients: list[str],
    n_boot: int,
    ci: float,
    label_names: list[str],
) -> dict[str, dict[str, float]]:
    """Mean over foreground classes per case, then a patient-level bootstrap over cases."""
    out = {}
    groups = _group_by_patient(patients)
    rng = np.random.default_rng(0)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    for name in ("dice", "iou", "hd95", "nsd"):
        per_class = np.stack([c[name] for c in cases]).astype(float)
        per_class[~np.isfinite(per_class)] = np.nan
        per_case = np.nanmean(per_class, axis=1)
        draws = []
        for _ in range(n_boot):
            idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
            draws.append(np.nanmean(per_case[idx]))
        draws = np.asarray(draws)
        draws = draws[np.isfinite(draws)]
        out[name] = {
            "value": float(np.nanmean(per_case)),
            "ci_low": float(np.percentile(draws, lo_q)) if len(draws) else float("nan"),
            "ci_high": float(np.percentile(draws, hi_q)) if len(draws) else float("nan"),
            "n_boot": int(len(draws)),
            "per_class": {
                n: float(np.nanmean(per_class[:, i])) for i, n in enumerate(label_names[1:])
            },
        }
    return out


def plot_roc(
    curves: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, metrics: dict
) -> None:
    """ROC curve(s), one per (name, probabilities, 0/1 targets), with the AUROC and its CI in
    the title; a class with one target value has no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchmetrics.functional.classification as tmc

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, p, y in curves:
        if y.min() == y.max():
            continue
        fpr, tpr, _ = tmc.binary_roc(p, y)
        ax.plot(fpr.numpy(), tpr.numpy(), label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    a = metrics["auroc"]
    ax.set_title(
        f"AUROC {a['value']:.3f} (95% CI {a['ci_low']:.3f}-{a['ci_high']:.3f})", fontsize=9
    )
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
