"""Labeled data for fine-tuning, read through `medfm.shards` readers only.

Rows come from the manifest's patient-level splits (`ShardDataset(split=...)`); targets come from
each sample's `labels` (classification, regression) or its label map (segmentation, patches from
`PatchSampler`). The labels table in the config is checked against the train rows before anything
trains: a class with no train samples, or a label the table does not know, stops the run with the
offending names. Inputs are preprocessed with the encoder's own contract (pretrain.preprocess).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.config import ConfigError
from medfm.models.contract import Contract
from medfm.shards import Manifest
from medfm.shards.dataset import ShardDataset
from medfm.shards.loader import ShardDataLoader
from medfm.shards.mixing import MixedDataset
from medfm.shards.patches import PatchSampler

from .config import FinetuneConfig, TaskConfig


class LabelError(ValueError):
    """Labels that do not fit the task's labels table."""


def encode_target(labels: dict[str, Any], task: TaskConfig, where: str) -> np.ndarray:
    """The numeric target of one sample: class index, multi-hot vector or float."""
    if task.label_key not in labels:
        raise LabelError(f"{where}: no label {task.label_key!r} (labels: {sorted(labels)})")
    value, names = labels[task.label_key], task.label_names

    def index(v: Any) -> int:
        if isinstance(v, str):
            if v not in names:
                raise LabelError(f"{where}: label {v!r} is not in the labels table {names}")
            return names.index(v)
        i = int(v)
        if not 0 <= i < len(names):
            raise LabelError(f"{where}: label index {i} is outside the labels table {names}")
        return i

    if task.type == "regression":
        return np.float32(value)
    if task.type == "multilabel":
        hot = np.zeros(len(names), np.float32)
        items = [k for k, on in value.items() if on] if isinstance(value, dict) else value
        for v in items if isinstance(items, (list, tuple)) else [items]:
            hot[index(v)] = 1.0
        return hot
    return np.int64(index(value))


def row_targets(rows: list[dict[str, Any]], task: TaskConfig, root: str) -> np.ndarray:
    return np.stack(
        [encode_target(json.loads(r["labels"]), task, f"{root}:{r['key']}") for r in rows]
    )


def check_label_table(targets: np.ndarray, task: TaskConfig, where: str) -> None:
    """Every class of the table must occur in train (else it can never be learned or scored)."""
    if task.type == "multilabel":
        counts = targets.sum(0)
    else:
        counts = np.bincount(targets, minlength=len(task.label_names))
    absent = [n for n, c in zip(task.label_names, counts, strict=True) if c == 0]
    if absent:
        raise LabelError(
            f"{where}: classes {absent} of task.label_names have no samples in the train split; "
            "drop them from the labels table or add labeled training data"
        )


def few_shot_keys(
    rows: list[dict[str, Any]], targets: np.ndarray, k: int, seed: int, task: TaskConfig
) -> set[str]:
    """Keys of k samples per class, drawn reproducibly by `seed` (multi-label: k positives)."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for c, name in enumerate(task.label_names):
        pool = np.flatnonzero(targets[:, c] > 0 if task.type == "multilabel" else targets == c)
        if len(pool) < k:
            raise LabelError(f"few-shot k={k}: class {name!r} has only {len(pool)} train samples")
        chosen.update(rows[i]["key"] for i in rng.choice(pool, size=k, replace=False))
    return chosen


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
    per contract. The flags let a run log the synthetic share it actually trained on."""

    def __init__(self, contract: Contract, task: TaskConfig, lut: np.ndarray | None = None):
        self.contract, self.task, self.lut = contract, task, lut

    def __call__(
        self, items: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        patients = [f"{it['meta']['dataset']}/{it['meta']['patient_id']}" for it in items]
        synthetic = torch.tensor([bool(it["meta"]["synthetic"]) for it in items])
        x = torch.stack([self.input(it) for it in items])
        if self.task.type == "segmentation":
            y = torch.stack([self.label_map(it, resize=True) for it in items])
        else:
            targets = [encode_target(it["meta"]["labels"], self.task, it["key"]) for it in items]
            y = torch.as_tensor(np.stack(targets))
        return x, y, patients, synthetic

    def input(self, item: dict[str, Any]) -> torch.Tensor:
        return self.contract.apply(item)["data"]

    def label_map(self, item: dict[str, Any], resize: bool = False) -> torch.Tensor:
        """Label-map values -> class indices (values not in the table become background).

        3D patches arrive as (1, I, J, K), already patch-sized; 2D maps as (H, W), which
        `resize` brings to the encoder's input size by nearest neighbour, as the image was."""
        lab = item["label_map"]
        classes = torch.from_numpy(self.lut[(lab[0] if lab.ndim == 4 else lab).numpy()])
        size = (self.contract.image_size,) * 2
        if resize and classes.ndim == 2 and tuple(classes.shape) != size:
            classes = F.interpolate(classes[None, None].float(), size=size, mode="nearest")[0, 0]
        return classes.long()


def label_lut(task: TaskConfig, max_value: int = 65536) -> np.ndarray:
    """Label-map value -> class index; values not in task.label_values map to background (0)."""
    values = task.label_values or list(range(len(task.label_names)))
    lut = np.zeros(max_value, np.int64)
    for i, v in enumerate(values):
        lut[v] = i
    return lut


def split_rows(
    root: str, split: str, cfg: FinetuneConfig, kinds: str | None = None
) -> list[dict[str, Any]]:
    """Manifest rows of one split after the config's filters (labels checks, few-shot)."""
    data = cfg.data
    rows = [r for r in Manifest.open(root).rows() if r["split"] == split]
    rows = [
        r
        for r in rows
        if (kinds is None or r["kind"] == kinds)
        and (not data.datasets or r["dataset"] in data.datasets)
        and (not data.modalities or r["modality"] in data.modalities)
    ]
    if not rows:
        raise ConfigError(f"data.shards: {root} has no {split} samples (after the data filters)")
    return rows


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
    split_rows(root, split, cfg, kinds)  # a clear error for an empty split
    return ShardDataset(
        root,
        split=split,
        kinds=kinds,
        datasets=cfg.data.datasets,
        modalities=cfg.data.modalities,
        labels=KeyFilter(keys) if keys is not None else None,
        shuffle=shuffle,
        seed=cfg.train.seed,
        decode="tensor",
        patches=patches,
        name=f"{root}:{split}",
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
