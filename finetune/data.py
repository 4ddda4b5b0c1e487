"""Labeled data for fine-tuning, read through `medfm.shards` readers only.

Rows come from the manifest's patient-level splits (`medfm.shards.select_rows`, and
`ShardDataset(split=...)` with the same filters); the task (finetune/tasks/) makes the targets
from each sample's `labels` (classification, regression) or its label map (segmentation, patches
from `PatchSampler`) and checks them against its labels table before anything trains. Inputs are
preprocessed with the encoder's own contract (medfm.models.contract).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medfm.config import ConfigError
from medfm.models.contract import Contract
from medfm.shards import Manifest, select_rows
from medfm.shards.dataset import ShardDataset
from medfm.shards.loader import ShardDataLoader
from medfm.shards.mixing import MixedDataset
from medfm.shards.patches import PatchSampler

if TYPE_CHECKING:
    from .config import FinetuneConfig
    from .tasks import SampleTask, Task


def row_targets(rows: list[dict[str, Any]], task: SampleTask, root: str) -> np.ndarray:
    """The numeric targets of manifest rows (their labels are JSON)."""
    return np.stack([task.target(json.loads(r["labels"]), f"{root}:{r['key']}") for r in rows])


class KeyFilter:
    """Row predicate keeping the chosen keys (a class, not a lambda: workers pickle it)."""

    def __init__(self, keys: set[str]):
        self.keys = frozenset(keys)

    def __call__(self, row: dict[str, Any]) -> bool:
        return row["key"] in self.keys


def contract_from_dict(d: dict[str, Any]) -> Contract:
    """A Contract from its `describe()` form (extra keys, e.g. pretraining's source, dropped)."""
    known = {f.name for f in fields(Contract)}
    c = {k: v for k, v in d.items() if k in known}
    c["window"] = tuple(c["window"]) if c.get("window") else None
    c["patch_size"] = tuple(c.get("patch_size") or ())
    return Contract(**c)


def contract_for(encoder_contract: dict[str, Any], encoder: Any, cfg: FinetuneConfig) -> Contract:
    """The encoder's preprocessing contract, with the config's explicit overrides applied."""
    known = {f.name for f in fields(Contract)}
    c = {k: v for k, v in encoder_contract.items() if k in known}
    ec = encoder.config
    c.setdefault("kind", encoder.kind)
    c.setdefault("channels", ec.in_chans)
    if encoder.kind == "image2d":
        c.setdefault("image_size", ec.img_size)
    elif encoder.kind == "volume3d":
        c["patch_size"] = tuple(cfg.task.patch_size or ec.img_size)
    if cfg.data.intensity is not None:
        c["intensity"], c["window"] = cfg.data.intensity, cfg.data.window
    c["window"] = tuple(c["window"]) if c.get("window") else None
    c["patch_size"] = tuple(c.get("patch_size") or ())
    return Contract(**c)


class Collate:
    """Items from ShardDataset -> (inputs, targets, patient ids, synthetic flags), preprocessed
    per contract, targets as the task makes them. The flags let a run log the synthetic share it
    actually trained on."""

    def __init__(self, contract: Contract, task: Task):
        self.contract, self.task = contract, task

    def __call__(
        self, items: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        patients = [f"{it['meta']['dataset']}/{it['meta']['patient_id']}" for it in items]
        synthetic = torch.tensor([bool(it["meta"]["synthetic"]) for it in items])
        x = torch.stack([self.input(it) for it in items])
        return x, self.task.collate_targets(items, self.contract), patients, synthetic

    def input(self, item: dict[str, Any]) -> torch.Tensor:
        return self.contract.apply(item)["data"]


def manifest_split(cfg: FinetuneConfig, split: str) -> str | None:
    """The manifest split behind a run's `split`: all of them when the task splits each volume
    into slabs instead (task.region_split); the segmentation sampler then cuts out the slab."""
    return None if cfg.task.region_split is not None else split


def split_rows(
    root: str,
    split: str,
    cfg: FinetuneConfig,
    kinds: str | None = None,
    keys: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Manifest rows of one split after the config's filters (and `keys`, if given)."""
    data = cfg.data
    table = select_rows(
        Manifest.open(root).table,
        split=manifest_split(cfg, split),
        kinds=kinds,
        modalities=data.modalities or None,
        datasets=data.datasets or None,
        labels=KeyFilter(keys) if keys is not None else None,
        synthetic=None,
    )
    if table.num_rows == 0:
        raise ConfigError(f"data.shards: {root} has no {split} samples (after the data filters)")
    return table.to_pylist()


def split_dataset(
    root: str,
    split: str,
    cfg: FinetuneConfig,
    *,
    shuffle: bool,
    keys: set[str] | None = None,
    patches: PatchSampler | None = None,
    kinds: str | None = None,
) -> ShardDataset:
    """Training sets (`shuffle`) split by rank under DDP; evaluation sets are read whole by every
    rank, so that each scores the same split and they agree on the best epoch."""
    split_rows(root, split, cfg, kinds)  # a clear error for an empty split
    whole = {} if shuffle else {"rank": 0, "world_size": 1}
    return ShardDataset(
        root,
        split=manifest_split(cfg, split),
        kinds=kinds,
        datasets=cfg.data.datasets,
        modalities=cfg.data.modalities,
        labels=KeyFilter(keys) if keys is not None else None,
        shuffle=shuffle,
        seed=cfg.train.seed,
        decode="tensor",
        patches=patches,
        name=f"{root}:{split}",
        **whole,
    )


def with_synthetic(
    real: ShardDataset, synthetic: ShardDataset, ratio: float, seed: int
) -> MixedDataset:
    """Real and synthetic train samples, synthetic making up `ratio` of each epoch's draws."""
    n = int(round(len(real) / (1 - ratio)))
    return MixedDataset(
        {real: 1 - ratio, synthetic: ratio},
        seed=seed,
        mode="resample",
        samples_per_epoch=n,
        names=["real", "synthetic"],
    )


def loader(ds: Any, collate: Collate, cfg: FinetuneConfig) -> ShardDataLoader:
    return ShardDataLoader(
        ds, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate
    )


def manifest_record(root: str) -> dict[str, Any]:
    h = Manifest.open(root).header
    return {
        "uri": root,
        "manifest_sha256": h["manifest"]["sha256"],
        "num_samples": h["num_samples"],
        "datasets": h.get("datasets", {}),
    }
