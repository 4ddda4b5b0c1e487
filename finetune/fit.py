"""The training loop every task shares: AdamW with warmup and cosine decay, a val score per
epoch, the best epoch's weights restored; and batched prediction.

It runs on pretraining's engine, a Lightning Trainer: the same precision rule (bf16 autocast on
a GPU, fp32 on the CPU: medfm.engine), DDP over `train.devices` x `train.num_nodes` processes,
gradient clipping. A multi-process run starts its processes and process group first
(`launch`), before any data is read: shard datasets split by rank, so what a task reads before
training (the epoch length, a probe's cached train features) is already each rank's share.
Every rank scores val on the whole split (evaluation datasets do not split by rank), so all
ranks see the same score; only rank 0 writes the run folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from medfm.device import select_device
from medfm.engine import precision_for

from .model import FinetuneModel, param_groups

if TYPE_CHECKING:
    from .config import FinetuneConfig, TrainConfig

BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)
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


# -- the engine ----------------------------------------------------------------------------------


def accelerator_for(t: TrainConfig) -> str:
    """Lightning's accelerator for `train.device` (auto, cpu, cuda, cuda:N)."""
    device = str(t.device)
    return device if device in ("auto", "cpu") else "gpu"


def devices_for(t: TrainConfig) -> int | str | list[int]:
    device = select_device(t.device) if t.device != "auto" else None
    if device is not None and device.index is not None and t.devices == 1:
        return [device.index]  # cuda:N: that one GPU
    return t.devices


def world_size(t: TrainConfig) -> int:
    """Processes the run trains in (`devices: auto` counts the GPUs, or 1 on the CPU)."""
    devices = devices_for(t)
    if devices == "auto" or devices == -1:
        devices = torch.cuda.device_count() if accelerator_for(t) != "cpu" else 1
    count = len(devices) if isinstance(devices, list) else int(devices)
    return max(count, 1) * t.num_nodes


def strategy_for(t: TrainConfig) -> str:
    """DDP whenever more than one process trains (`auto` too), else one device."""
    return "ddp" if t.strategy == "ddp" or world_size(t) > 1 else "auto"


def launch(t: TrainConfig) -> torch.device:
    """This process's device, after starting the run's other processes and the process group
    when it has several (see the module docstring); one process: `train.device`."""
    if world_size(t) == 1:
        return select_device(t.device)
    fabric = L.Fabric(
        accelerator=accelerator_for(t),
        devices=devices_for(t),
        num_nodes=t.num_nodes,
        strategy="ddp",
    )
    fabric.launch()  # re-runs this command once per further local rank (Lightning's launcher)
    return fabric.device


def is_global_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Epochs:
    """`batches()` anew on each pass, sized `length`: what Lightning runs as one epoch."""

    def __init__(self, batches: Batches, length: int):
        self.batches, self.length = batches, length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.batches()):
            if len(x) == 1 and i:
                # The heads' BatchNorm cannot train on one sample. Only an epoch's last, ragged
                # batch can be this small (the order is shuffled, so which sample is skipped
                # varies by epoch); it is skipped, as drop_last would, not crashed on. It is
                # left out here, not in training_step: DDP cannot skip a step, and every rank
                # holds as many samples, so all of them leave it out together.
                continue
            yield x, y

    def __len__(self) -> int:
        return self.length


class FitModule(L.LightningModule):
    """One fit: `trained` (the model, or its head on cached features) is the module Lightning
    moves, wraps in DDP and optimizes; the rest of the model is only read (its head's norms,
    the state kept per best epoch)."""

    def __init__(
        self, model: FinetuneModel, trained: torch.nn.Module, evaluate: Callable[[], float],
        cfg: FinetuneConfig, steps_per_epoch: int,
    ):  # fmt: skip
        super().__init__()
        self.trained = trained
        self.parts = (model,)  # a tuple: not registered, so a probe's frozen encoder stays put
        self.evaluate, self.cfg = evaluate, cfg
        t = cfg.train
        self.total, self.warmup = t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch)
        self.step = 0
        self.best = {"score": -math.inf, "epoch": 0, "state": trainable_state(model)}
        self.history: list[dict[str, Any]] = []
        self.progress = Progress(t.epochs)
        self.losses: list[torch.Tensor] = []
        self.seen = 0

    @property
    def model(self) -> FinetuneModel:
        return self.parts[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = param_groups(self.model, self.cfg.mode, t.lr, t.weight_decay, t.layer_decay)
        self.opt = torch.optim.AdamW(groups)
        return self.opt

    def on_train_epoch_start(self) -> None:
        self.trained.train()
        reset_norm_stats(self.model.head)
        self.losses, self.seen = [], 0

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        set_lr(self.opt, self.step, self.total, self.warmup, self.cfg.train.lr)
        loss = self.model.task.loss(self.trained(x), y)
        self.losses.append(loss.detach())  # read back once per epoch: no per-step host sync
        self.seen, self.step = self.seen + len(x), self.step + 1
        return loss

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch
        loss = float(torch.stack(self.losses).double().mean()) if self.losses else math.nan
        score = self.evaluate()
        self.history.append({"epoch": epoch + 1, "train_loss": loss, "val_score": score})
        if self.trainer.is_global_zero:
            self.progress.log(epoch, self.seen * self.trainer.world_size, loss=loss, val=score)
        if score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch + 1, "state": trainable_state(self.model)}


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
    with `evaluate` (higher is better) and restore the best epoch's weights at the end.
    `steps_per_epoch` is the length of this rank's `train_batches()`; `device` is where the
    caller put the model (launch's), where Lightning trains it."""
    t = cfg.train
    if world_size(t) > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(
            f"train.devices x train.num_nodes = {world_size(t)} processes, but they were not "
            "started: call finetune.fit.launch(cfg.train) before reading data (train.run does)"
        )
    module = FitModule(model, trained, evaluate, cfg, steps_per_epoch)
    trainer = L.Trainer(
        accelerator="cpu" if device.type == "cpu" else "gpu",
        devices=devices_for(t),
        num_nodes=t.num_nodes,
        strategy=strategy_for(t),
        precision=precision_for(t.precision, accelerator_for(t)),
        max_epochs=t.epochs,
        gradient_clip_val=t.clip_grad or None,
        logger=False,
        enable_checkpointing=False,  # the best epoch's weights are kept in memory
        enable_progress_bar=False,  # Progress prints one line per epoch instead
        enable_model_summary=False,
        use_distributed_sampler=False,  # medfm.shards splits data by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=Epochs(train_batches, steps_per_epoch))
    model.load_state_dict(module.best["state"], strict=False)
    engine = {
        "strategy": type(trainer.strategy).__name__,
        "precision": trainer.precision,
        "world_size": trainer.world_size,
        "accelerator": type(trainer.accelerator).__name__,
        "clip_grad": t.clip_grad,
        "steps_per_epoch": steps_per_epoch,  # this rank's: the data split between the ranks
        "optimizer_steps": module.step,
    }
    return {
        "best_epoch": module.best["epoch"],
        "best_val_score": module.best["score"],
        "history": module.history,
        "engine": engine,
    }
