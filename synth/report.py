"""The audit's PNG pages: an overview and the closest synthetic/real pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from medfm.io import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: audits run headless)


def _show(ax, x: torch.Tensor, title: str = "") -> None:
    img = x[0].numpy()
    if img.ndim == 3:  # volume: middle slice
        img = img[img.shape[0] // 2]
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def report_png(path: str | Path, report: dict[str, Any], x_syn, x_train, m, held_sims, cal) -> None:
    fig = plt.figure(figsize=(11, 8))
    grid = fig.add_gridspec(4, 8)
    for i in range(min(8, len(x_syn))):
        _show(fig.add_subplot(grid[0, i]), x_syn[i], "synthetic" if i == 0 else "")
    for i in range(min(8, len(x_train))):
        _show(fig.add_subplot(grid[1, i]), x_train[i], "real train" if i == 0 else "")
    ax = fig.add_subplot(grid[2:, :4])
    held, syn = (np.asarray(v, dtype=np.float64) for v in (held_sims, m.pixel_similarity))
    # Shared bins, at least 1e-3 wide in all: similarities of pure noise are all but equal, and
    # numpy cannot cut a float32 range that narrow into 40 bins.
    lo, hi = min(held.min(), syn.min()), max(held.max(), syn.max())
    bins = np.linspace(lo, max(hi, lo + 1e-3), 41)
    ax.hist(held, bins=bins, alpha=0.6, density=True, label="real held-out -> train")
    ax.hist(syn, bins=bins, alpha=0.6, density=True, label="synthetic -> train")
    ax.axvline(cal.pixel_threshold, color="r", ls="--", label="flag threshold")
    ax.set(xlabel="nearest-neighbour pixel correlation", ylabel="density")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[2:, 4:])
    ax.axis("off")
    lines = [
        f"verdict: {report['verdict'].upper()}",
        f"features: {report['fidelity']['feature_space']}",
    ]
    for c in report["checks"]:
        bound = (
            f"<= {c['max']}"
            if c["max"] is not None
            else f">= {c['min']}"
            if c["min"] is not None
            else "(reported)"
        )
        lines.append(f"{'ok  ' if c['pass'] else 'FAIL'} {c['name']}: {c['value']:.4g} {bound}")
    lines.append(f"flagged: {report['memorization']['flagged']} of {report['counts']['synthetic']}")
    ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def closest_pairs_png(path: str | Path, x_syn, x_train, m, n: int) -> None:
    """The n synthetic samples most similar (pixel correlation) to a training sample."""
    order = np.argsort(-m.pixel_similarity)[: max(1, min(n, len(x_syn)))]
    fig, axes = plt.subplots(2, len(order), figsize=(1.6 * len(order), 3.6), squeeze=False)
    for col, i in enumerate(order):
        _show(axes[0, col], x_syn[i], f"synth r={m.pixel_similarity[i]:.3f}")
        _show(axes[1, col], x_train[m.pixel_index[i]], "nearest real")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
