"""Shard data for pretraining, built only from medfm.shards readers.

medfm.shards.ShardDataModule is the LightningDataModule: the distributed, shuffled, exactly
resumable sample stream, synthetic mixing by weight, 3D training patches, its position in every
checkpoint. This module turns a DataConfig into its ShardDataConfig and adds what pretraining
needs on top: the preprocessing contract as a seeded transform, cross-modal partners, and the
data kind and classes the model is checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from medfm.models.contract import Contract, sorted_classes
from medfm.shards import Manifest, check_synthetic, check_training_set
from medfm.shards.datamodule import ShardDataConfig, ShardDataModule, SourceConfig
from medfm.shards.dataset import ShardDataset
from medfm.shards.schema import ehr_vocab_size
from medfm.shards.transforms import ItemTransform

from .config import ConfigError, DataConfig, PairConfig, PretrainConfig

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


def sources(dc: DataConfig, keep: Callable[[dict], bool] | None = None) -> list[SourceConfig]:
    """`mix` or `shards`, plus synthetic shards at their ratio; `keep` filters rows."""
    mix = dict(dc.mix) if dc.mix else {dc.shards: 1.0}
    weights = [(root, dc.split, float(w)) for root, w in mix.items()]
    if dc.synthetic is not None:
        r = dc.synthetic.ratio
        if not 0.0 < r < 1.0:
            raise ConfigError(f"data.synthetic.ratio: must be in (0, 1), got {r}")
        real = sum(w for _, _, w in weights)
        weights.append((dc.synthetic.shards, None, real * r / (1 - r)))
    return [
        SourceConfig(
            root,
            weight,
            split,
            datasets=dc.datasets,
            modalities=dc.modalities,
            kinds=dc.kinds,
            labels=keep,
            name=str(root).rstrip("/"),  # as a ShardDataset names itself: items' "source"
        )
        for root, split, weight in weights
    ]


def single_kind(dc: DataConfig, roots: list[str]) -> str:
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


def set_vocab_size(cfg: PretrainConfig) -> None:
    """An EHR encoder's vocab_size from the shard sets it reads (their manifests record the
    vocabulary), plus one id: the encoder's own [MASK], its last id. Set before the model is
    built; a configured vocab_size too small for the shards is refused."""
    from medfm.models import ENCODERS

    dc = cfg.data
    roots = {"model": [s.root for s in sources(dc)], "pair_model": [dc.pair.shards] if dc.pair
             else []}  # fmt: skip
    for key in ("model", "pair_model"):
        spec = getattr(cfg, key)
        entry = ENCODERS.entry(spec.get("name", ""), f"{key}.name") if spec else None
        if entry is None or "vocab_size" not in getattr(
            entry.config_cls, "__dataclass_fields__", {}
        ):
            continue
        try:
            shards = max((ehr_vocab_size(Manifest.open(r).header) for r in roots[key]), default=0)
        except FileNotFoundError as e:
            raise ConfigError(f"data: no shard set at {e}") from e
        if not shards:
            continue  # shards written without a recorded vocabulary: keep the configured size
        if "vocab_size" in spec and spec["vocab_size"] < shards + 1:
            raise ConfigError(
                f"{key}.vocab_size: {spec['vocab_size']} is too small for the shards' vocabulary "
                f"of {shards} tokens (+1 for [MASK]); leave it unset to take it from the shards"
            )
        spec.setdefault("vocab_size", shards + 1)


def shard_config(
    dc: DataConfig,
    contract: Contract,
    seed: int,
    srcs: list[SourceConfig],
    transform: ContractTransform,
) -> ShardDataConfig:
    """The shared data module's settings for pretraining."""
    volume = contract.kind == "volume3d"
    return ShardDataConfig(
        train=srcs,
        batch_size=dc.batch_size,
        num_workers=dc.num_workers,
        prefetch_factor=4,
        seed=seed,
        mix_mode=dc.mix_mode,
        drop_last=True,  # equal batches on every rank
        patch_size=contract.patch_size if volume else None,
        patch_mode="uniform",
        patches_per_volume=dc.patches_per_volume,
        train_transform=transform,
        batch_transform=unpack_pair,
    )


class PretrainData:
    """The ShardDataModule a DataConfig describes (`module`, what Trainer.fit gets), with the
    contract, partners, data kind and classes the model is checked against and exported with."""

    def __init__(
        self, dc: DataConfig, contract: Contract, seed: int, pair_contract: Contract | None = None
    ):
        self.config, self.contract = dc, contract
        self.pairing = Pairing(dc.pair, dc.split, pair_contract) if dc.pair else None
        transform = ContractTransform(contract, self.pairing, dc.class_key)
        # The audit gate, before any sample is read (docs/synth.md).
        self.synthetic_audit = check_synthetic(dc.synthetic) if dc.synthetic else None
        self.sources = sources(dc, self.pairing.has_partner if self.pairing else None)
        self.training_set_audit = self._training_set_audit(dc)
        self.kind = single_kind(dc, [s.root for s in self.sources])
        contract.kind = contract.kind or self.kind  # objectives without an encoder: the data's
        self.module = ShardDataModule(shard_config(dc, contract, seed, self.sources, transform))
        self.datasets = self._datasets()
        self.classes = self._classes(dc)
        transform.classes = self.classes
        self.pair_kind = self.pairing.kind if self.pairing else None

    def _training_set_audit(self, dc: DataConfig) -> dict[str, Any]:
        """{root: gate record} of each data.shards/data.mix set that holds synthetic rows."""
        where = "data.mix" if dc.mix else "data.shards"
        real = [s.root for s in self.sources if not dc.synthetic or s.root != dc.synthetic.shards]
        found = {root: check_training_set(root, dc.allow_unaudited, where) for root in real}
        return {root: record for root, record in found.items() if record is not None}

    def _datasets(self) -> list[ShardDataset]:
        try:
            return self.module.train_datasets()
        except ValueError as e:  # no rows match
            what = " (with a partner in data.pair)" if self.pairing else ""
            raise ConfigError(f"data: {e}{what}") from e

    def _classes(self, dc: DataConfig) -> list[Any]:
        """The classes of the real training rows (synthetic rows must reuse them)."""
        if not dc.class_key:
            return []
        synthetic = dc.synthetic.shards if dc.synthetic else None
        values: set[Any] = set()
        for src, ds in zip(self.sources, self.datasets, strict=True):
            if src.root != synthetic:
                try:
                    values |= ds.label_values(dc.class_key)
                except ValueError as e:
                    raise ConfigError(f"data.class_key: {e}") from e
        return sorted_classes(values)

    def manifest_hashes(self) -> dict[str, str]:
        roots = [s.root for s in self.sources]
        if self.pairing:
            roots.append(self.pairing.config.shards)
        return {root: Manifest.open(root).header["manifest"]["sha256"] for root in roots}

    def describe(self) -> dict[str, Any]:
        return {
            "sources": [
                {"root": s.root, "split": s.split, "weight": s.weight} for s in self.sources
            ],
            "manifests": self.manifest_hashes(),
            "synthetic_audit": self.synthetic_audit,
            "training_set_audit": self.training_set_audit,
            "kind": self.kind,
            "class_key": self.config.class_key,
            "classes": self.classes,
        }
