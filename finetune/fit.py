"""The training loop every task shares: AdamW with warmup and cosine decay, a val score per
epoch, the best epoch's weights restored; and batched prediction."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .model import FinetuneModel, param_groups

if TYPE_CHECKING:
    from .config import FinetuneConfig

BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def trainable_state(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters plus the head's buffers (BatchNorm stats)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if n in trained or n.startswith("head.")
    }


def reset_norm_stats(module: torch.nn.Module) -> None:
    """Cumulative-average BatchNorms restart each epoch: their statistics then describe the
    encoder as it is now, not as it was at the start of training."""
    for m in module.modules():
        if isinstance(m, BATCH_NORMS) and m.momentum is None:
            m.reset_running_stats()


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, base_lr: float) -> None:
    """Linear warmup, then cosine decay to zero; each group keeps its layer-decay scale."""
    if step < warmup:
        scale = (step + 1) / warmup
    else:
        scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    for g in opt.param_groups:
        g["lr"] = base_lr * g["lr_scale"] * scale


@torch.no_grad()
def predict(
    fn: Callable, batches: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(outputs, targets, patient ids) over a loader yielding Collate's batches."""
    outs, ys, patients = [], [], []
    for x, y, p, *_ in batches:
        outs.append(fn(x.to(device)).float().cpu())
        ys.append(y)
        patients += p
    return torch.cat(outs), torch.cat(ys), patients


class Progress:
    """One line per epoch with rate and ETA (runs on real data are long)."""

    def __init__(self, epochs: int):
        self.epochs, self.start = epochs, time.time()

    def log(self, epoch: int, n: int, **values: float) -> None:
        per_epoch = (time.time() - self.start) / (epoch + 1)
        eta = per_epoch * (self.epochs - epoch - 1)
        fields = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        rate = n / max(per_epoch, 1e-9)
        print(
            f"epoch {epoch + 1}/{self.epochs} {fields} {rate:.1f} samples/s ETA {eta:.0f}s",
            flush=True,
        )


def fit_epochs(
    model: FinetuneModel,
    trained: torch.nn.Module,
    train_batches: Batches,
    evaluate: Callable[[], float],
    cfg: FinetuneConfig,
    device: torch.device,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """Train `trained` (the model, or just its head on cached features), score val each epoch
    with `evaluate` (higher is better) and restore the best epoch's weights at the end."""
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, cfg.mode, t.lr, t.weight_decay, t.layer_decay))
    total, warmup, step = t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch), 0
    best = {"score": -math.inf, "epoch": 0, "state": trainable_state(model)}
    history, progress = [], Progress(t.epochs)
    for epoch in range(t.epochs):
        trained.train()
        reset_norm_stats(model.head)
        losses, n = [], 0
        for x, y in train_batches():
            if len(x) == 1 and len(losses):
                # The heads' BatchNorm cannot train on one sample. Only an epoch's last, ragged
                # batch can be this small (the order is shuffled, so which sample is skipped
                # varies by epoch); it is skipped, as drop_last would, not crashed on.
                continue
            set_lr(opt, step, total, warmup, t.lr)
            loss = model.task.loss(trained(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n, step = n + len(x), step + 1
        score = evaluate()
        history.append(
            {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_score": score}
        )
        progress.log(epoch, n, loss=float(np.mean(losses)), val=score)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": trainable_state(model)}
    model.load_state_dict(best["state"], strict=False)
    return {"best_epoch": best["epoch"], "best_val_score": best["score"], "history": history}
