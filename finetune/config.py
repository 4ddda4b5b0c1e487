"""Fine-tuning configs: small @dataclasses read from YAML, validated before any data is read.

Validation is the config engine's (medfm.config, docs/configs.md): unknown keys and wrong types
fail with their dotted path, as in every other stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medfm.config import ConfigError, from_dict, read_tree
from medfm.shards import SyntheticConfig

# What a finished run writes last (medfm.finetune.train); an export reads it (no Lightning needed).
RUN_RECORD = "run.json"


@dataclass
class DataConfig:
    shards: str
    synthetic: SyntheticConfig | None = None
    # Train on a `shards` set holding synthetic rows without a passing audit (recorded).
    allow_unaudited: bool = False
    datasets: list[str] | None = None
    modalities: list[str] | None = None
    batch_size: int = 32
    num_workers: int = 0
    # Preprocessing: the encoder's own contract (its sidecar) unless overridden here.
    intensity: Literal["auto", "unit", "zscore", "window"] | None = None
    window: tuple[float, float] | None = None


@dataclass
class RegionSplitConfig:
    """Segmentation of few volumes: train, val and test are slabs of each volume along `axis`
    (the manifest's patient split is not used), so one labelled CT can train and be scored on
    voxels it never trained on."""

    axis: int = 0
    # The slabs in their order along the axis, each a fraction of the length left after the gaps.
    slabs: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2})
    # Voxels left out between neighbouring slabs; at least (and by default) the patch's extent
    # along the axis, so a window at a slab's face has no neighbour within a patch of it.
    gap: int | None = None
    # Each val/test slab is scored as `blocks` consecutive blocks along `blocks_axis` (default:
    # `axis`): the cases the bootstrap resamples, since one volume gives no patient-level CI.
    blocks: int = 1
    blocks_axis: int | None = None


@dataclass
class TaskConfig:
    # A name in medfm.finetune.TASKS (binary, multiclass, multilabel, regression, segmentation
    # or a plugin's); checked by validate() so a typo fails with a suggestion before any data.
    type: str
    label_key: str = "label"  # key of Sample.labels holding the target (not for segmentation)
    # The labels table: index -> name. Classification and segmentation need it.
    label_names: list[str] = field(default_factory=list)
    # Segmentation: the label-map value of each class in label_names (others -> class 0).
    label_values: list[int] | None = None
    patch_size: tuple[int, ...] | None = None  # segmentation training patch; default: encoder's
    overlap: float = 0.25  # sliding-window overlap at inference
    pool: Literal["mean", "cls"] = "mean"  # embedding for classification/regression heads
    region_split: RegionSplitConfig | None = None  # segmentation: slabs as the splits


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers of every transformer block: timm's fused qkv, attention out, MLP (PEFT #691).
    targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    )


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    layer_decay: float = 0.75  # full fine-tuning: block i gets lr * decay^(depth - i)
    warmup_epochs: float = 0.5
    few_shot_k: int = 0  # > 0: k train samples per class, drawn by `seed`
    # 2D lora/full: random shift (pixels, edge-padded) and zoom (max relative scale change)
    # of each training image; 0 = off. Small images overfit fast without it.
    augment_shift: int = 0
    augment_scale: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    # The engine (pretraining's, finetune/fit.py): DDP over devices x num_nodes processes
    # (strategy auto: DDP when there are several), precision auto: bf16-mixed on a GPU, 32-true
    # on the CPU; clip_grad > 0 clips the gradient norm.
    devices: int | str = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp"] = "auto"
    precision: str = "auto"
    clip_grad: float = 0.0
    patches_per_volume: int = 8  # segmentation: random training patches per volume per epoch


@dataclass
class EvalConfig:
    bootstrap: int = 1000  # patient-level bootstrap replicates for the 95% CIs
    ci: float = 0.95
    nsd_tolerance_mm: float = 2.0
    plots: bool = True
    # Binary decision threshold on the probability for accuracy, sensitivity, ...: 0.5, or
    # chosen on val with the best weights ("val_youden": max sensitivity + specificity,
    # independent of prevalence; "val_accuracy": max val accuracy). Test never picks it.
    threshold: float | Literal["val_youden", "val_accuracy"] = 0.5


@dataclass
class FinetuneConfig:
    name: str
    out_dir: str
    encoder: str  # exported encoder folder, or hub://REPO@REV
    data: DataConfig
    task: TaskConfig
    mode: Literal["linear_probe", "lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: dict | None = None
) -> FinetuneConfig:
    """Read YAML (or take `base`), apply `key=value` overrides, validate, return the config."""
    cfg = from_dict(FinetuneConfig, read_tree(path, overrides, base))
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    from .tasks import task_for  # the task's own checks; tasks import torch, configs need not
    from .tasks.segmentation import Segmentation

    t = cfg.task
    task = task_for(t)
    task.validate(cfg)
    if t.region_split is not None and not isinstance(task, Segmentation):
        raise ConfigError("task.region_split: only segmentation splits volumes into slabs")
    if len(set(t.label_names)) != len(t.label_names):
        raise ConfigError(f"task.label_names: duplicate names in {t.label_names}")
    if cfg.data.synthetic and not 0 <= cfg.data.synthetic.ratio < 1:
        raise ConfigError(
            f"data.synthetic.ratio: must be in [0, 1), got {cfg.data.synthetic.ratio}"
        )
    if cfg.data.intensity == "window" and cfg.data.window is None:
        raise ConfigError("data.window: intensity=window needs [low, high]")
    for name in ("epochs", "bootstrap"):
        section = cfg.train if name == "epochs" else cfg.eval
        if getattr(section, name) < 1:
            raise ConfigError(f"{name}: must be >= 1")
    if not 0 < cfg.eval.ci < 1:
        raise ConfigError(f"eval.ci: must be in (0, 1), got {cfg.eval.ci}")
