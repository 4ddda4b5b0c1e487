"""PNG outputs at checkpoints: the loss curve and, for objectives that can show one (MAE), a
grid of inputs, masked inputs and reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from medfm.io import save_figure

PREVIEW_SEED = 1234  # fixed, so grids at different steps show the same masks


def loss_curve(history: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, losses = zip(*history, strict=True)
    ax.plot(steps, losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log" if min(losses) > 0 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _image(t: torch.Tensor) -> Any:
    """A displayable 2D array: channel 0; the middle slice (last axis) of a volume."""
    t = t.float().cpu()
    if t.ndim == 4:  # (C, I, J, K)
        t = t[..., t.shape[-1] // 2]
    return t[0].numpy()


def preview_grid(rows: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """One row per tensor (input, masked, reconstruction), one column per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = min(8, len(rows[names[0]]))
    signal = rows[names[0]].ndim == 3
    fig, axes = plt.subplots(len(names), n, figsize=(1.6 * n, 1.6 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r][c]
            if signal:  # (leads, T): lead 0 as a trace
                ax.plot(rows[name][c, 0].float().cpu().numpy(), lw=0.5)
            else:
                ax.imshow(_image(rows[name][c]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


class PlotCallback(L.Callback):
    """Writes plots/loss.png and plots/<objective>_step<N>.png whenever a checkpoint is saved."""

    def __init__(self, out_dir: str):
        self.dir = Path(out_dir) / "plots"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> None:
        previews = {}
        if pl_module.preview_batch is not None:
            batch = {k: v.to(pl_module.device) for k, v in pl_module.preview_batch.items()}
            saved, pl_module.ctx.seed = pl_module.ctx.seed, PREVIEW_SEED
            for key, obj in pl_module.objectives.items():
                out = obj.preview(batch)
                if out is not None:
                    previews[key] = out
            pl_module.ctx.seed = saved
        if not trainer.is_global_zero:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(pl_module.history) > 1:
            loss_curve(pl_module.history, self.dir / "loss.png")
        step = trainer.global_step
        for key, rows in previews.items():
            preview_grid(rows, self.dir / f"{key}_step{step:07d}.png", f"{key} at step {step}")
