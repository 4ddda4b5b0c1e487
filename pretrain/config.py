"""Pretraining configs: small @dataclasses, loaded from YAML plus `key=value` overrides by the
config engine (medfm.config, docs/configs.md).

Validation is strict and happens before any data is read: an unknown key or a value of the wrong
type fails with its dotted path (`train.lr: expected float, got 'fast'`). Encoder and objective
parameters are validated against the config dataclass their registry entry owns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medfm.config import ConfigError, from_dict, read_tree
from medfm.io import sha256_bytes
from medfm.shards import SyntheticConfig


@dataclass
class PairConfig:
    """The second modality of cross-modal training: rows joined to the primary on `join`."""

    shards: str
    kinds: list[str] | None = None
    modalities: list[str] | None = None
    join: Literal["patient_id", "study_id"] = "patient_id"


@dataclass
class DataConfig:
    shards: str = ""
    mix: dict[str, float] = field(default_factory=dict)  # {shard root: weight}, else `shards`
    synthetic: SyntheticConfig | None = None
    # Train on a `shards`/`mix` set holding synthetic rows without a passing audit (recorded).
    allow_unaudited: bool = False
    pair: PairConfig | None = None
    split: str = "train"
    kinds: list[str] | None = None
    modalities: list[str] | None = None
    datasets: list[str] | None = None
    batch_size: int = 32
    num_workers: int = 2
    # Preprocessing contract, recorded in the export sidecar.
    intensity: Literal["auto", "unit", "zscore", "window"] = "auto"
    window: tuple[float, float] | None = None  # HU (or value) range for intensity=window
    patches_per_volume: int = 8  # 3D: random patches drawn per volume per epoch
    signal_length: int = 0  # samples per signal crop; 0 = the whole signal
    max_tokens: int = 256  # EHR sequence crop
    mix_mode: Literal["resample", "exhaust"] = "resample"
    # labels[class_key] becomes batch["class_index"] (an index into the sorted classes of the
    # training rows) for class-conditional objectives; "" = no class labels in batches.
    class_key: str = ""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # Peak learning rate: `lr` as given, or `blr` (base lr, per 256 samples) scaled by the
    # effective batch as in MAE (He et al., 2022): lr = blr * batch * grad_accum * world / 256.
    # Neither set: DEFAULT_LR. Setting both is refused.
    lr: float | None = None
    blr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float = 1.0  # <1: earlier encoder blocks get lower learning rates
    warmup_steps: int = 100
    grad_accum: int = 1
    clip_grad: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA
    compile: bool = False  # torch.compile each objective's loss (encoder, decoder, loss)
    compile_backend: str = "inductor"  # torch.compile's backend; aot_eager: capture, no codegen
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    checkpoint_every: int = 500
    log_every: int = 10  # also how often losses are read back from the device and checked
    peak_flops: float = 0.0  # FLOP/s per device for MFU; 0: the GPU's bf16 peak (none on CPU)
    on_nan: Literal["stop", "skip"] = "stop"
    seed: int = 0
    plots: bool = True
    ledger: bool = False  # record the sample keys each rank trains on (data lineage)
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])


DEFAULT_LR = 1.5e-4


def effective_batch(cfg: PretrainConfig, world_size: int) -> int:
    """Samples per optimizer step: batch_size x grad_accum x world size."""
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


def resolved_lr(cfg: PretrainConfig, world_size: int) -> float:
    """The peak learning rate the run uses (blr scaled by the effective batch, when given)."""
    t = cfg.train
    if t.blr is not None:
        return t.blr * effective_batch(cfg, world_size) / 256
    return DEFAULT_LR if t.lr is None else t.lr


@dataclass
class PretrainConfig:
    name: str
    out_dir: str
    data: DataConfig
    objectives: list[dict[str, Any]]  # [{name: mae, weight: 1.0, ...objective params}]
    model: dict[str, Any] | None = None  # {name: vit2d, size: tiny, ...}; None: objectives own
    pair_model: dict[str, Any] | None = None  # second encoder, for cross-modal objectives
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything that changes what is trained (not logging or loader workers)."""
        d = self.to_dict()
        d.pop("out_dir")
        # Runs from before `blr` existed keep their fingerprint (and so stay resumable).
        if d["train"].pop("blr") is not None:
            d["train"]["blr"] = self.train.blr
        if d["train"]["lr"] is None:
            d["train"]["lr"] = DEFAULT_LR
        d["data"].pop("num_workers")
        if not d["data"]["allow_unaudited"]:  # the default: runs from before it keep theirs too
            d["data"].pop("allow_unaudited")
        for k in ("log_every", "checkpoint_every", "plots", "loggers", "compile", "ledger",
                  "peak_flops", "compile_backend"):  # fmt: skip
            d["train"].pop(k)
        return sha256_bytes(json.dumps(d, sort_keys=True).encode())[:16]


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    base: dict | None = None,
    smoke: bool = False,
):
    """Read YAML (or take `base`), apply overrides, validate everything, return PretrainConfig.

    A packaged recipe carries a `smoke:` list of `key=value` overrides (tiny sizes, a few steps,
    the same objective settings); `smoke=True` (`medfm pretrain --smoke`) applies them before
    `overrides`. Without it the list is ignored."""
    tree = read_tree(path, (), base)
    smoke_overrides = tree.pop("smoke", None) or []
    if not isinstance(smoke_overrides, list) or not all(
        isinstance(o, str) for o in smoke_overrides
    ):
        raise ConfigError("smoke: expected a list of key=value overrides")
    if smoke and not smoke_overrides:
        raise ConfigError(f"smoke: {path or 'the config'} has no smoke overrides (--smoke)")
    tree = read_tree(None, smoke_overrides if smoke else (), tree)
    cfg = from_dict(PretrainConfig, read_tree(None, overrides, tree))
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Resolve encoder and objective parameters through their registries (fails early)."""
    from medfm.models import ENCODERS

    from .objectives import OBJECTIVES

    if not cfg.data.shards and not cfg.data.mix:
        raise ConfigError("data.shards: set a shard set root (or data.mix)")
    for key, spec in (("model", cfg.model), ("pair_model", cfg.pair_model)):
        if spec is not None:
            params = dict(spec)
            name = params.pop("name", "")
            ENCODERS.entry(name, f"{key}.name")
            ENCODERS.config(name, params, key)
    if not cfg.objectives:
        raise ConfigError("objectives: at least one objective is required")
    for i, spec in enumerate(cfg.objectives):
        params = dict(spec)
        params.pop("weight", None)
        name = params.pop("name", "")
        OBJECTIVES.entry(name, f"objectives[{i}].name")
        OBJECTIVES.config(name, params, f"objectives[{i}]")
    t = cfg.train
    if t.lr is not None and t.blr is not None:
        raise ConfigError(
            f"train.lr ({t.lr}) and train.blr ({t.blr}) are mutually exclusive: set lr for a "
            "fixed learning rate, or blr to scale it by the effective batch (blr * batch / 256)"
        )
    for name in ("lr", "blr"):
        if (getattr(t, name) or 0.0) < 0:
            raise ConfigError(f"train.{name}: must be >= 0, got {getattr(t, name)}")
    for name in ("max_steps", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {cfg.data.batch_size}")
