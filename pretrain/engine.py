"""The LightningModule: encoders + weighted objectives, AdamW with layer-wise decay, cosine
schedule with warmup, optional EMA, resume-exact randomness, NaN policy.

GPU-ready: TF32 matmuls and fused AdamW on CUDA, `torch.compile` of every objective's loss (the
encoder and decoder graphs it runs), channels_last CNN encoders, activation checkpointing under
any strategy, and no device-to-host read in the step: the losses of `train.log_every` steps are
read back (and checked for NaN/inf) together, and before every checkpoint is written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medfm.models import Encoder, build_encoder

from .config import PretrainConfig, resolved_lr
from .objectives import OBJECTIVES, Context

STEP_SALT = 0x57E9


class NonFiniteLossError(RuntimeError):
    """Raised (train.on_nan=stop) when the loss is NaN/inf; the last good checkpoint is kept."""


def cosine_with_warmup(warmup: int, total: int, floor: float):
    """LR multiplier: linear warmup to 1, then cosine down to `floor` at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fast_math(device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions for what still runs in float32 on CUDA."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]):
    """AdamW; the fused CUDA kernel when every parameter is on a CUDA device."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def is_cnn(encoder: Encoder | None) -> bool:
    """A 2D encoder without transformer blocks: a timm CNN (ResNet, ConvNeXt), run NHWC."""
    return encoder is not None and encoder.kind == "image2d" and len(encoder.blocks) == 0


class HostCountedEMA(AveragedModel):
    """`AveragedModel` whose "first update?" test is a host flag instead of reading
    `n_averaged` from the device twice per step (a GPU-to-host sync each). The state dict is
    AveragedModel's own, so checkpoints written before it load unchanged."""

    started: bool | None = None  # None: not known yet (read n_averaged once, e.g. after resume)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.started is None:
            self.started = bool(self.n_averaged > 0)
        if not self.started:
            super().update_parameters(model)  # the first update copies the weights
            self.started = True
            return
        groups: dict[tuple[Any, Any], tuple[list, list]] = {}
        for a, b in zip(
            [*self.module.parameters(), *self.module.buffers()],
            [*model.parameters(), *model.buffers()],
            strict=True,
        ):  # grouped by device and dtype, as AveragedModel does
            mine, theirs = groups.setdefault((a.device, a.dtype), ([], []))
            mine.append(a.detach())
            theirs.append(b.detach())
        for mine, theirs in groups.values():
            self.multi_avg_fn(mine, theirs, self.n_averaged)
        self.n_averaged += 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.started = None  # loaded weights (a resume): read n_averaged again, once
        super()._load_from_state_dict(*args, **kwargs)


class PretrainModule(L.LightningModule):
    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder: Encoder | None = build_encoder(cfg.model) if cfg.model else None
        self.pair_encoder = build_encoder(cfg.pair_model, "pair_model") if cfg.pair_model else None
        self.ctx = Context(self.encoder, self.pair_encoder)
        self.objectives = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for i, spec in enumerate(cfg.objectives):
            params = dict(spec)
            name, weight = params.pop("name"), float(params.pop("weight", 1.0))
            key = name if name not in self.objectives else f"{name}_{i}"
            self.objectives[key] = OBJECTIVES.build(
                name, params, self.ctx, where=f"objectives[{i}]"
            )
            self.weights[key] = weight
        self.ema = None
        if cfg.train.ema_decay > 0:
            # EMA of what gets exported: the encoder, or (no encoder, e.g. diffusion) the
            # objectives that own their networks.
            self.ema = HostCountedEMA(
                self.ema_target(),
                multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                use_buffers=True,
            )
        self.skipped_steps = 0
        self.shapes_checked = False
        self._history: list[tuple[int, float]] = []  # (step, loss) for the loss-curve PNG
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back
        self.read_at: list[int] = []  # steps `pending` was read back at (one transfer each)
        self.preview_batch: dict[str, Any] | None = None

    def ema_target(self) -> nn.Module:
        return self.encoder if self.encoder is not None else self.objectives

    def check_data(self, kind: str, pair_kind: str | None, classes: list[Any] = ()) -> None:
        """Refuse an encoder/objective that does not match the shards, before any step."""
        if self.encoder is not None:
            self.encoder.check_kind(kind)  # raises, naming both kinds
        if self.pair_encoder is not None:
            self.pair_encoder.check_kind(pair_kind)
        for obj in self.objectives.values():
            obj.check(kind)
            obj.check_classes(list(classes))
            if obj.needs_pair and pair_kind is None:
                raise ValueError(f"objective {obj.name!r} needs paired data: set data.pair")

    @property
    def history(self) -> list[tuple[int, float]]:
        """(step, loss) of every step so far on rank 0, pending ones included (read back here;
        checked for NaN at their flush, which stays collective: this read may be rank 0's only)."""
        if not self.pending:
            return self._history
        steps, values = zip(*self.pending, strict=True)
        return self._history + list(zip(steps, torch.stack(values).tolist(), strict=True))

    @history.setter
    def history(self, value: list[tuple[int, float]]) -> None:
        self.pending, self._history = [], value

    def configure_model(self) -> None:
        t = self.cfg.train
        if is_cnn(self.encoder):
            self.encoder.to(memory_format=torch.channels_last)
        if t.activation_checkpointing and t.strategy != "fsdp":  # FSDP's strategy applies it
            blocks = tuple(
                b for enc in (self.encoder, self.pair_encoder) if enc for b in enc.block_types()
            )
            if blocks:  # CheckpointWrapper's state-dict hooks keep the parameter names as they are
                apply_activation_checkpointing(self, check_fn=lambda m: isinstance(m, blocks))
        if t.compile:
            # The loss is what a step runs: encoder, decoder/heads and the loss itself in one
            # graph (an encoder's `forward` alone is not what MAE calls). Compiling the bound
            # method leaves the modules, and so state_dict keys, as they are.
            for obj in self.objectives.values():
                obj.loss = torch.compile(obj.loss, backend=t.compile_backend)

    def setup(self, stage: str) -> None:
        fast_math(self.device)

    def memory_format(self, batch: dict[str, Any]) -> dict[str, Any]:
        """NHWC images for a CNN encoder (its weights are NHWC too: cuDNN's fast layout)."""
        if is_cnn(self.encoder) and batch["data"].ndim == 4:
            batch["data"] = batch["data"].contiguous(memory_format=torch.channels_last)
        return batch

    def step_seed(self, used: int) -> int:
        """Seed for this micro-batch's masks/views: from (seed, rank, samples used before it)."""
        seq = np.random.SeedSequence([self.cfg.train.seed, STEP_SALT, self.global_rank, used])
        return int(seq.generate_state(1)[0])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.shapes_checked:  # the first batch: shapes the encoder cannot take fail here
            if self.encoder is not None:
                self.encoder.check_input(batch["data"], None)
            if self.pair_encoder is not None:
                self.pair_encoder.check_input(batch["pair"]["data"], None)
            self.shapes_checked = True
        dm = self.trainer.datamodule
        self.ctx.seed = self.step_seed(dm.used)
        # Counted at batch start: the checkpoint callback runs before module batch-end hooks.
        dm.count(len(batch["data"]))
        if self.cfg.train.ledger:
            self.write_ledger(batch.get("key", []))

    def write_ledger(self, keys: list[str]) -> None:
        """Append this step's sample keys to ledger/rank<r>.txt (which data each rank saw)."""
        path = Path(self.cfg.out_dir) / "ledger" / f"rank{self.global_rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("".join(f"{self.global_step}\t{k}\n" for k in keys))

    def objective_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        total, logs = 0.0, {}
        for key, obj in self.objectives.items():
            out = obj.loss(batch)
            total = total + self.weights[key] * out["loss"]
            logs.update({f"train/{key}/{k}": v.detach() for k, v in out.items()})
        return total, logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.preview_batch is None or batch_idx % 50 == 0:
            self.preview_batch = {k: v[:8] for k, v in batch.items() if k in ("data",)}
        loss, logs = self.objective_losses(self.memory_format(batch))
        if self.cfg.train.on_nan == "skip" and not self.all_finite(loss.detach()[None]):
            # Skipping a batch is a host decision before backward: a read every step.
            self.skipped_steps += 1
            self.print(f"step {self.global_step}: non-finite loss {float(loss)}; batch skipped "
                       "(train.on_nan=skip)")  # fmt: skip
            return None
        logs["train/loss"] = loss.detach()
        if "synthetic" in batch:
            logs["data/synthetic_fraction"] = batch["synthetic"].float().mean()
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=len(batch["data"]))
        self.pending.append((self.global_step, loss.detach()))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self.pending) >= self.cfg.train.log_every:
            self.flush()

    def on_train_end(self) -> None:
        self.flush()

    def all_finite(self, values: torch.Tensor) -> bool:
        """Whether `values` are finite on every rank (all ranks must take the same branch)."""
        finite = torch.isfinite(values).all().float()
        if self.trainer.world_size > 1:
            finite = self.all_gather(finite).min()
        return bool(finite > 0)

    def flush(self) -> None:
        """Read the pending losses back in one transfer; stop at a non-finite one (on_nan=stop:
        the steps since run on, but no checkpoint is written from them, since checkpoints
        flush first)."""
        if not self.pending:
            return
        steps, values = zip(*self.pending, strict=True)
        self.pending = []
        stacked = torch.stack(values).float()
        finite = self.all_finite(stacked)
        losses = stacked.tolist()
        self.read_at.append(self.global_step)
        if not finite:
            bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), 0)
            raise NonFiniteLossError(
                f"loss became {losses[bad]} at step {steps[bad]}; stopping (train.on_nan=stop). "
                f"The last good checkpoint is kept in {self.cfg.out_dir}/checkpoints"
            )
        if self.global_rank == 0:
            self._history.extend(zip(steps, losses, strict=True))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.ema_target())

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """No decay on norms/biases/tokens; layer-wise LR decay over the encoder's blocks."""
        t = self.cfg.train
        depth = len(self.encoder.blocks) if self.encoder is not None else 0
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("ema."):
                continue
            decay = 0.0 if p.ndim < 2 or "token" in name or "pos" in name else t.weight_decay
            scale = 1.0
            if name.startswith("encoder.") and t.layer_decay < 1.0:
                layer = self.encoder.layer_id(name[len("encoder.") :])
                scale = t.layer_decay ** (depth + 1 - layer)
            groups.setdefault((decay, scale), []).append(p)
        return [
            {"params": ps, "weight_decay": d, "lr": lr * s, "lr_scale": s}
            for (d, s), ps in sorted(groups.items())
        ]

    def configure_optimizers(self):
        t = self.cfg.train
        lr = resolved_lr(self.cfg, self.trainer.world_size)  # blr scales with the global batch
        opt = adamw(self.param_groups(lr), lr, t.betas)
        floor = t.min_lr / lr if lr > 0 else 0.0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_with_warmup(t.warmup_steps, t.max_steps, floor)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def flops_per_sample(self) -> float:
        return sum(o.flops_per_sample() for o in self.objectives.values())

    def export_encoder(self) -> Encoder | None:
        """The encoder to export: its EMA when one is kept."""
        if self.ema is not None and self.encoder is not None:
            return self.ema.module
        return self.encoder

    def export_objectives(self) -> nn.ModuleDict:
        """The objectives whose modules get exported: their EMA when no encoder is kept."""
        if self.ema is not None and self.encoder is None:
            return self.ema.module
        return self.objectives

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.flush()  # a non-finite pending loss stops the run before this checkpoint is written
        # Plain JSON-able data only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["medfm"] = {
            "config": self.cfg.to_dict(),
            "fingerprint": self.cfg.fingerprint(),
            "skipped_steps": self.skipped_steps,
            "history": [list(h) for h in self.history[-10000:]],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning keeps the data module's state under its class name; checkpoints written
        # before pretraining used medfm.shards.ShardDataModule name it PretrainDataModule.
        if "PretrainDataModule" in checkpoint:
            checkpoint.setdefault("ShardDataModule", checkpoint.pop("PretrainDataModule"))
        meta = checkpoint.get("medfm", {})
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.history = [(int(s), float(v)) for s, v in meta.get("history", [])]
