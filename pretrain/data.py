"""Shard data for pretraining, built only from medfm.shards readers.

ShardDataset/MixedDataset give the distributed, shuffled, exactly resumable sample stream (and
synthetic mixing by weight); PatchSampler cuts 3D training patches by chunk. This module adds
what pretraining needs on top: the preprocessing contract as a seeded transform, cross-modal
partners, and a LightningDataModule whose state (samples that reached the training step) rides
in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from medfm.models.contract import Contract, sorted_classes
from medfm.shards import Manifest
from medfm.shards.dataset import ShardDataset
from medfm.shards.loader import ShardDataLoader
from medfm.shards.mixing import MixedDataset
from medfm.shards.patches import PatchSampler
from medfm.shards.transforms import ItemTransform

from .config import ConfigError, DataConfig, PairConfig

PAIR_PREFIX = "pair_"  # partner fields are flattened (pair_data, ...) so default collation works


class Pairing:
    """Cross-modal partners: samples of a second shard set that share `join` with the primary."""

    def __init__(self, pc: PairConfig, split: str, contract: Contract):
        self.config, self.contract = pc, contract
        if pc.kinds and "volume3d" in pc.kinds:
            raise ConfigError("data.pair: volume partners are not supported; pair 2D/signal/EHR")
        try:
            self.dataset = ShardDataset(
                pc.shards, split=split, kinds=pc.kinds, modalities=pc.modalities, shuffle=False
            )
        except ValueError as e:
            raise ConfigError(f"data.pair: {e}") from e
        self.by_key: dict[str, list[int]] = {}
        for unit in range(self.dataset.num_units()):  # no patches: one unit per row
            self.by_key.setdefault(self.dataset.row(unit)[pc.join], []).append(unit)
        self.kind = self.dataset.row(0)["kind"]

    def has_partner(self, row: dict[str, Any]) -> bool:
        return row[self.config.join] in self.by_key

    def partner(self, meta: dict[str, Any]) -> dict[str, Any]:
        choices = self.by_key[meta[self.config.join]]
        unit = choices[int(torch.randint(len(choices), (1,)))]
        item = self.contract.apply(self.dataset.load(unit, 0))
        return {PAIR_PREFIX + k: v for k, v in item.items() if k not in ("key", "synthetic")}


class ContractTransform(ItemTransform):
    """Applies the contract (and attaches a partner) with the per-sample seed medfm.shards sets;
    with a class key, adds the sample's class_index for class-conditional objectives."""

    def __init__(self, contract: Contract, pairing: Pairing | None = None, class_key: str = ""):
        super().__init__(lambda x: x)
        self.contract, self.pairing, self.class_key = contract, pairing, class_key
        self.classes: list[Any] = []  # set by the data module once the rows are selected

    def _apply(self, item: dict[str, Any]) -> dict[str, Any]:
        out = self.contract.apply(item)
        if "source" in item:
            out["source"] = item["source"]
        if self.class_key:
            out["class_index"] = self.class_index(item)
        if self.pairing is not None:
            out.update(self.pairing.partner(item["meta"]))
        return out

    def class_index(self, item: dict[str, Any]) -> int:
        value = item["meta"]["labels"].get(self.class_key)
        if value not in self.classes:  # e.g. a synthetic sample of a class train lacks
            raise ValueError(
                f"sample {item['key']}: labels[{self.class_key!r}]={value!r} is not one of the "
                f"training classes {self.classes}"
            )
        return self.classes.index(value)


def unpack_pair(batch: dict[str, Any]) -> dict[str, Any]:
    """Regroup flattened partner fields as batch["pair"] (what cross-modal objectives read)."""
    pair = {k[len(PAIR_PREFIX) :]: batch.pop(k) for k in list(batch) if k.startswith(PAIR_PREFIX)}
    if pair:
        batch["pair"] = pair
    for part in (batch, pair):
        if part and part["data"].dtype == torch.int64:
            part["pad_mask"] = part["data"] == 0
    return batch


class PretrainDataModule(L.LightningDataModule):
    """The training loader from a DataConfig; checkpoints carry its position."""

    def __init__(
        self, dc: DataConfig, contract: Contract, seed: int, pair_contract: Contract | None = None
    ):
        super().__init__()
        self.config, self.contract, self.seed = dc, contract, seed
        self.pairing = Pairing(dc.pair, dc.split, pair_contract) if dc.pair else None
        transform = ContractTransform(contract, self.pairing, dc.class_key)
        self.sources = self._sources(dc)
        self.kind = self._single_kind(dc, [root for root, _, _ in self.sources])
        contract.kind = contract.kind or self.kind  # objectives without an encoder: the data's
        self.datasets = {
            root: self._dataset(root, split, transform) for root, split, _ in self.sources
        }
        self.classes = self._classes(dc)
        transform.classes = self.classes
        self.pair_kind = self.pairing.kind if self.pairing else None
        self.used = 0  # samples that reached the training step, ever (seeds the objectives)
        self._loader: ShardDataLoader | None = None
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def _sources(dc: DataConfig) -> list[tuple[str, str | None, float]]:
        """(root, split, weight): `mix` or `shards`, plus synthetic shards at their ratio."""
        mix = dict(dc.mix) if dc.mix else {dc.shards: 1.0}
        out = [(root, dc.split, float(w)) for root, w in mix.items()]
        if dc.synthetic is not None:
            r = dc.synthetic.ratio
            if not 0.0 < r < 1.0:
                raise ConfigError(f"data.synthetic.ratio: must be in (0, 1), got {r}")
            real = sum(w for _, _, w in out)
            out.append((dc.synthetic.shards, None, real * r / (1 - r)))
        return out

    @staticmethod
    def _single_kind(dc: DataConfig, roots: list[str]) -> str:
        """The one data kind the sources hold (after data.kinds); mixed kinds are refused."""
        kinds = set()
        for root in roots:
            try:
                kinds |= set(Manifest.open(root).table.column("kind").to_pylist())
            except FileNotFoundError as e:
                raise ConfigError(f"data: no shard set at {root} ({e})") from e
        kinds = kinds & set(dc.kinds) if dc.kinds else kinds
        if len(kinds) != 1:
            raise ConfigError(f"data: the shards hold kinds {sorted(kinds)}; set data.kinds to one")
        return kinds.pop()

    def _classes(self, dc: DataConfig) -> list[Any]:
        """The classes of the real training rows (synthetic rows must reuse them)."""
        if not dc.class_key:
            return []
        synthetic = dc.synthetic.shards if dc.synthetic else None
        values: set[Any] = set()
        for root, ds in self.datasets.items():
            if root != synthetic:
                try:
                    values |= ds.label_values(dc.class_key)
                except ValueError as e:
                    raise ConfigError(f"data.class_key: {e}") from e
        return sorted_classes(values)

    def _dataset(self, root: str, split: str | None, transform: ContractTransform) -> ShardDataset:
        dc = self.config
        patches = None
        if self.contract.kind == "volume3d":
            patches = PatchSampler(
                root,
                self.contract.patch_size,
                mode="uniform",
                seed=self.seed,
                patches_per_volume=dc.patches_per_volume,
            )
        keep = self.pairing.has_partner if self.pairing else None
        try:
            ds = ShardDataset(
                root,
                split=split,
                kinds=dc.kinds,
                modalities=dc.modalities,
                datasets=dc.datasets,
                labels=keep,
                seed=self.seed,
                transform=transform,
                patches=patches,
                drop_last=True,  # equal batches on every rank
            )
        except ValueError as e:  # no rows match
            what = " (with a partner in data.pair)" if self.pairing else ""
            raise ConfigError(f"data: {e}{what}") from e
        return ds

    def train_dataset(self):
        if len(self.datasets) == 1:
            return next(iter(self.datasets.values()))
        weights = {self.datasets[root]: w for root, _, w in self.sources}
        return MixedDataset(weights, seed=self.seed, mode=self.config.mix_mode)

    def manifest_hashes(self) -> dict[str, str]:
        roots = [root for root, _, _ in self.sources]
        if self.pairing:
            roots.append(self.pairing.config.shards)
        return {root: Manifest.open(root).header["manifest"]["sha256"] for root in roots}

    def describe(self) -> dict[str, Any]:
        return {
            "sources": [{"root": r, "split": s, "weight": w} for r, s, w in self.sources],
            "manifests": self.manifest_hashes(),
            "kind": self.kind,
            "class_key": self.config.class_key,
            "classes": self.classes,
        }

    # --- Lightning ----------------------------------------------------------------------
    def train_dataloader(self) -> ShardDataLoader:
        dc = self.config
        loader = ShardDataLoader(
            self.train_dataset(),
            dc.batch_size,
            num_workers=dc.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=dc.num_workers > 0,
            prefetch_factor=4 if dc.num_workers else None,
            drop_last=True,
        )
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        self._loader = loader
        return loader

    def count(self, n: int) -> None:
        """Called by the module when a batch reaches the training step."""
        self.used += n

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return unpack_pair(batch)

    def state_dict(self) -> dict[str, Any]:
        loader = self._loader.state_dict() if self._loader is not None else self._pending
        return {"used": self.used, "train": loader}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = int(state.get("used", 0))
        if state.get("train"):
            self._pending = state["train"]
            if self._loader is not None:
                self._loader.load_state_dict(self._pending)
                self._pending = None
