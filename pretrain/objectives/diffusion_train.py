"""Interim Lightning training for class-conditional 2D diffusion, until the engine's batches
carry class labels (unconditional 2D and all 3D models train through `medfm pretrain`).

`DiffusionModule` is a LightningModule around `DiffusionObjective.loss`; `fit_diffusion` builds
data from shards, trains, and exports (EMA) weights plus a PNG sample grid and loss curve every
`checkpoint_every` steps. The objective is the engine's registered one, unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..config import ConfigError, from_dict
from .diffusion import DiffusionConfig, DiffusionObjective
from .diffusion_data import ImageShardDataset
from .diffusion_export import export_diffusion
from .diffusion_sampling import SamplerSettings, sample


@dataclass
class DiffusionDataConfig:
    shards: str
    split: str = "train"
    class_key: str = ""  # labels[class_key] conditions the model; "" = unconditional
    window: tuple[float, float] | None = None  # intensity window; None = the dtype's range
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class DiffusionTrainSettings:
    max_steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.0  # 0 = no EMA; exports use the EMA weights when on
    checkpoint_every: int = 500
    grid_samples: int = 16  # samples in the PNG grid at each export (0 = none)
    grid_sampler_steps: int = 25
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    precision: str = "auto"  # bf16-mixed on GPU, 32-true on CPU


@dataclass
class DiffusionRunConfig:
    name: str
    out_dir: str
    data: DiffusionDataConfig
    objective: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: DiffusionTrainSettings = field(default_factory=DiffusionTrainSettings)


def load_run_config(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> DiffusionRunConfig:
    """Strictly validated run config from YAML (unknown keys fail with their path)."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    for key, value in (overrides or {}).items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    cfg = from_dict(DiffusionRunConfig, tree)
    cfg.objective.check()
    return cfg


class EMA(nn.Module):
    """Exponential moving average of weights, with the usual warmup (decay grows with steps)."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            s.copy_(b)


class DiffusionModule(L.LightningModule):
    """Trains a DiffusionObjective with AdamW and warmup-cosine; keeps an optional EMA."""

    def __init__(self, objective: DiffusionObjective, settings: DiffusionTrainSettings):
        super().__init__()
        self.objective, self.settings = objective, settings
        self.ema = EMA(objective, settings.ema_decay) if settings.ema_decay > 0 else None
        self.losses: list[tuple[int, float]] = []
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The objective draws noise from the context's per-step seed (as under the engine).
        seq = np.random.SeedSequence([self.settings.seed, self.global_step])
        self.objective._ctx.seed = int(seq.generate_state(1)[0])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.objective.loss(batch)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"diffusion loss is {loss.item()} at step {self.global_step}")
        n = batch["data"].shape[0]
        now = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/samples_per_s", n / max(now - self._t0, 1e-9), prog_bar=True)
        self._t0 = now
        self.losses.append((self.global_step, float(loss.detach())))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.objective, self.global_step)

    def inference_objective(self) -> DiffusionObjective:
        return self.ema.shadow if self.ema is not None else self.objective

    def configure_optimizers(self):
        s = self.settings
        opt = torch.optim.AdamW(self.objective.parameters(), lr=s.lr, weight_decay=s.weight_decay)

        def schedule(step: int) -> float:
            if step < s.warmup_steps:
                return (step + 1) / s.warmup_steps
            progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def save_grid(images: np.ndarray, path: Path, title: str = "") -> None:
    """(N, C, *spatial) in [0, 1] -> one PNG grid (3D: the middle slice of each sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, images, strict=False):
        img = img[0]
        if img.ndim == 3:
            img = img[img.shape[0] // 2]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses, strict=True) if losses else ((), ())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=0.8)
    ax.set(xlabel="step", ylabel="diffusion loss", yscale="log", title="training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ExportCallback(L.Callback):
    """Every `checkpoint_every` steps and at the end: export, sample grid, loss curve."""

    def __init__(self, out_dir: Path, export_kwargs: dict[str, Any], settings):
        self.out_dir, self.export_kwargs, self.settings = out_dir, export_kwargs, settings
        self.exports: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.settings.checkpoint_every == 0 and step < self.settings.max_steps:
            self.export(pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(pl_module, trainer.global_step)

    def export(self, module: DiffusionModule, step: int) -> None:
        objective = module.inference_objective()
        folder = self.out_dir / "exports" / f"step-{step:07d}"
        self.exports.append(export_diffusion(objective, folder, step=step, **self.export_kwargs))
        save_loss_curve(module.losses, self.out_dir / "loss.png")
        n = self.settings.grid_samples
        if n:
            classes = self.export_kwargs["classes"]
            labels = [i % len(classes) for i in range(n)] if classes else None
            settings = SamplerSettings("ddim", self.settings.grid_sampler_steps)
            was_training = objective.training
            objective.eval()
            x = sample(objective, list(range(n)), settings, labels, module.device)
            objective.train(was_training)
            save_grid(x.cpu().numpy(), folder / "samples.png", f"step {step}")


def build_dataset(cfg: DiffusionRunConfig) -> ImageShardDataset:
    d, o = cfg.data, cfg.objective
    if o.spatial_dims != 2:
        raise ConfigError(
            "objective.spatial_dims: 3D diffusion trains through the engine "
            "(medfm pretrain --config pretrain/configs/diffusion_3d_tiny.yaml)"
        )
    ds = ImageShardDataset(d.shards, d.split, d.class_key, d.window)
    shape = ds.contract["shape"]
    channels = 1 if len(shape) == 2 else shape[2]
    if tuple(shape[:2]) != tuple(o.sample_size) or channels != o.in_channels:
        raise ConfigError(
            f"objective.sample_size/in_channels: the shards hold {shape} images but the model "
            f"takes {o.in_channels}x{list(o.sample_size)}"
        )
    if len(ds.classes) != o.num_classes:
        raise ConfigError(
            f"objective.num_classes: is {o.num_classes} but {d.shards} has "
            f"{len(ds.classes)} classes under labels[{d.class_key!r}]: {ds.classes}"
        )
    return ds


@dataclass
class DiffusionRun:
    exports: list[Path]  # exported weights, oldest first
    losses: list[tuple[int, float]]  # (step, loss) per training step


def fit_diffusion(cfg: DiffusionRunConfig) -> DiffusionRun:
    """Train, export every `checkpoint_every` steps and at the end."""
    L.seed_everything(cfg.train.seed, workers=True)
    ds = build_dataset(cfg)
    loader = DataLoader(
        ds,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        drop_last=len(ds) > cfg.data.batch_size,
        persistent_workers=cfg.data.num_workers > 0,
    )
    out = Path(cfg.out_dir)
    manifest = ds.shards.manifest.header["manifest"]
    export_kwargs = {
        "preprocessing": ds.contract,
        "classes": ds.classes,
        "class_key": cfg.data.class_key,
        "data_manifests": [{"root": cfg.data.shards, "sha256": manifest["sha256"]}],
    }
    callback = ExportCallback(out, export_kwargs, cfg.train)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    trainer = L.Trainer(
        max_steps=cfg.train.max_steps,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        precision=precision,
        callbacks=[callback],
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    module = DiffusionModule(DiffusionObjective(cfg.objective), cfg.train)
    trainer.fit(module, loader)
    return DiffusionRun(callback.exports, module.losses)


def main(argv: list[str] | None = None) -> None:
    """`python -m medfm.pretrain.objectives.diffusion_train CONFIG.yaml [key=value ...]`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: diffusion_train CONFIG.yaml [key=value ...]")
    overrides = dict(a.split("=", 1) for a in args[1:])
    cfg = load_run_config(args[0], {k: yaml.safe_load(v) for k, v in overrides.items()})
    run = fit_diffusion(cfg)
    print(f"exported {run.exports[-1]}")


if __name__ == "__main__":
    main()
