"""Statistics of bench/learning.py's seeds: per-cell mean and spread, and paired differences with
95% intervals, from each cell's saved test outputs (`test_outputs.safetensors`).

Why a hierarchical bootstrap: a difference between two methods varies with the training seed
(pretraining, subset draw, fine-tuning) and with the 624 test images, which every seed shares.
A t-interval over 3 seeds sees only the first, a bootstrap over images only the second. Each
replicate here draws the seeds with replacement *and* the test images with replacement (the same
images for both methods: paired), and averages the difference over the drawn seeds. The t-interval
over seeds is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

T_CRIT_95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided, by number of seeds


def test_scores(cell_dir: Path) -> np.ndarray:
    """The cell's test outputs as the stage scores them: float32 probabilities of class 1.
    (Not the logits: where the sigmoid saturates, its ties are part of the stage's AUC.)"""
    import torch
    from safetensors.torch import load_file

    out = load_file(str(cell_dir / "test_outputs.safetensors"))["outputs"].float()
    out = out.reshape(len(out), -1)
    p = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, 1)[:, 1]
    return p.numpy()


def auc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `scores` (B, N) against its row of `labels` (B, N): the
    Mann-Whitney statistic, ties counted half (as torchmetrics' binary AUROC)."""
    ranks = stats.rankdata(scores, axis=1)
    pos = labels.astype(bool)
    n_pos = pos.sum(1)
    n_neg = labels.shape[1] - n_pos
    return ((ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class Resamples:
    """One draw of test images and of seeds per replicate, shared by every comparison."""

    images: np.ndarray  # (B, N) indices into the test split
    seeds: np.ndarray  # (B, S) indices into the seed list

    @classmethod
    def draw(cls, n_images: int, n_seeds: int, n: int = 2000, seed: int = 0) -> Resamples:
        rng = np.random.default_rng(seed)
        return cls(rng.integers(0, n_images, (n, n_images)), rng.integers(0, n_seeds, (n, n_seeds)))


class Cells:
    """Every seed's test scores of every cell, and their bootstrap AUCs under one Resamples."""

    def __init__(self, labels: np.ndarray, resamples: Resamples):
        self.labels, self.r = labels, resamples
        self.boot_labels = labels[resamples.images]
        self.scores: dict[str, list[np.ndarray]] = {}
        self._boot: dict[str, np.ndarray] = {}

    def add(self, cell: str, scores: np.ndarray) -> float:
        """Adds one seed's scores of a cell; returns their AUC on the whole test split."""
        self.scores.setdefault(cell, []).append(scores)
        return float(auc_rows(scores[None], self.labels[None])[0])

    def boot(self, cell: str) -> np.ndarray:
        """(S, B) bootstrap AUCs of the cell, per seed."""
        if cell not in self._boot:
            self._boot[cell] = np.stack(
                [auc_rows(s[self.r.images], self.boot_labels) for s in self.scores[cell]]
            )
        return self._boot[cell]

    def paired(self, a: str, b: str) -> dict[str, Any]:
        """AUC(a) - AUC(b), mean over seeds: point, hierarchical 95% interval, seed t-interval."""
        n = min(len(self.scores[a]), len(self.scores[b]))
        full = [
            float(auc_rows(np.stack([x, y]), np.stack([self.labels] * 2)) @ [1, -1])
            for x, y in zip(self.scores[a][:n], self.scores[b][:n], strict=True)
        ]
        diff = self.boot(a)[:n] - self.boot(b)[:n]  # (S, B)
        seeds = self.r.seeds % n  # fewer seeds than drawn for: fold the draw onto them
        rep = np.take_along_axis(diff.T, seeds, axis=1).mean(1)  # (B,)
        lo, hi = np.percentile(rep, [2.5, 97.5])
        out = {
            "of": a,
            "minus": b,
            "seeds": n,
            "diff": round(float(np.mean(full)), 4),
            "ci": [round(float(lo), 4), round(float(hi), 4)],
            "per_seed": [round(d, 4) for d in full],
        }
        if n in T_CRIT_95:
            half = T_CRIT_95[n] * float(np.std(full, ddof=1)) / np.sqrt(n)
            out["seed_t_ci"] = [round(out["diff"] - half, 4), round(out["diff"] + half, 4)]
        return out


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, float)
    return round(float(v.mean()), 4), round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)
