"""ShardDataModule: train/val loaders over shard sets from one small config, resumable in Lightning.

Every stage that trains under Lightning reads data through this module; what a stage adds (its
item transform, a row filter, a batch transform) comes in through ShardDataConfig.

Its `state_dict` (saved in every Lightning checkpoint) is the training loader's position, so a
checkpoint written mid-epoch resumes with exactly the samples the run had not trained on, in the
same order, on `fit(ckpt_path=...)`. The loader counts the batches it has handed out; Lightning
fetches no batch ahead from a loader with a length (ours always have one), so that count is what
the training steps consumed - tests/test_readers_datamodule.py checks it in a real fit. The state
also carries `used`, the samples that reached the training step over the whole run, which the
LightningModule counts with `count(n)` (pretraining seeds its objectives' masks from it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from medfm.device import has_gpu

from .dataset import ShardDataset
from .loader import ShardDataLoader
from .mixing import MixedDataset
from .patches import PatchSampler
from .planned import PlannedDataset


@dataclass
class SourceConfig:
    """One training source: a shard set (path or URL) narrowed by manifest filters."""

    root: str
    weight: float = 1.0
    split: str | None = "train"
    datasets: Sequence[str] | None = None
    modalities: Sequence[str] | None = None
    kinds: Sequence[str] | None = None
    synthetic: bool | None = None
    labels: dict[str, Any] | Callable[[dict], bool] | None = None  # see ShardDataset
    name: str | None = None
    version: int | None = None  # a version of a set grown by --append (default: the newest)


@dataclass
class ShardDataConfig:
    """Sources and loader settings. `train` also accepts {root: weight}."""

    train: list[SourceConfig] | dict[str, float]
    val: str | SourceConfig | None = None
    batch_size: int = 8
    num_workers: int = 2
    pin_memory: bool | None = None  # None: pin when CUDA is available
    persistent_workers: bool = True
    prefetch_factor: int = 2
    seed: int = 0
    buffer_size: int = 1000
    mix_mode: str = "resample"
    samples_per_epoch: int | None = None
    drop_last: bool = False  # training: equal batches on every rank, no short last batch
    patch_size: Sequence[float] | None = None  # 3D volumes: patches of this size, else whole
    patch_units: str = "voxel"
    patch_mode: str = "foreground"
    val_patch_mode: str = "grid"
    foreground_fraction: float = 0.33
    patches_per_volume: int = 1
    patch_cache_dir: str | None = None
    on_error: str = "raise"
    max_skips: int = 10
    train_transform: Callable[..., Any] | None = None
    val_transform: Callable[..., Any] | None = None
    batch_transform: Callable[[Any], Any] | None = None  # on each batch once on the device
    storage_options: dict[str, Any] = field(default_factory=dict)

    def train_sources(self) -> list[SourceConfig]:
        if isinstance(self.train, dict):
            return [SourceConfig(root, weight) for root, weight in self.train.items()]
        return list(self.train)


class ShardDataModule(L.LightningDataModule):
    """Builds ShardDatasets (mixed when there are several sources) and ShardDataLoaders."""

    def __init__(self, config: ShardDataConfig):
        super().__init__()
        self.config = config
        self.sources = config.train_sources()
        # Made up front (they check their settings, no I/O), so a bad patch setting fails here.
        self._train_patches = [self._patches(s, config.patch_mode) for s in self.sources]
        self._train_datasets: list[ShardDataset] | None = None
        self._train_loader: ShardDataLoader | None = None
        self._pending: dict[str, Any] | None = None
        self.used = 0  # samples that reached the training step, ever (see count)
        if config.val is not None:  # as LightningDataModule.from_datasets: no val loader, no
            self.val_dataloader = self._val_dataloader  # val loop (and no warning about one)

    # --- datasets -------------------------------------------------------------------------
    def _patches(self, src: SourceConfig, mode: str) -> PatchSampler | None:
        c = self.config
        if c.patch_size is None:
            return None
        return PatchSampler(
            src.root,
            c.patch_size,
            units=c.patch_units,
            mode=mode,
            foreground_fraction=c.foreground_fraction,
            seed=c.seed,
            patches_per_volume=c.patches_per_volume if mode != "grid" else 1,
            cache_dir=c.patch_cache_dir,
            storage_options=c.storage_options,
            version=src.version,
        )

    def _dataset(
        self, src: SourceConfig, patches: PatchSampler | None, *, train: bool
    ) -> ShardDataset:
        c = self.config
        return ShardDataset(
            src.root,
            split=src.split,
            kinds=src.kinds,
            modalities=src.modalities,
            datasets=src.datasets,
            labels=src.labels,
            synthetic=src.synthetic,
            shuffle=train,
            seed=c.seed,
            buffer_size=c.buffer_size,
            transform=c.train_transform if train else c.val_transform,
            patches=patches,
            drop_last=c.drop_last and train,
            on_error=c.on_error,
            max_skips=c.max_skips,
            name=src.name,
            storage_options=c.storage_options,
            version=src.version,
        )

    def train_datasets(self) -> list[ShardDataset]:
        """One dataset per training source, in source order (made on first use, then kept)."""
        if self._train_datasets is None:
            pairs = zip(self.sources, self._train_patches, strict=True)
            self._train_datasets = [self._dataset(s, p, train=True) for s, p in pairs]
        return self._train_datasets

    def train_dataset(self) -> PlannedDataset:
        c = self.config
        datasets = self.train_datasets()
        if len(datasets) == 1:
            return datasets[0]
        return MixedDataset(
            {ds: s.weight for ds, s in zip(datasets, self.sources, strict=True)},
            seed=c.seed,
            mode=c.mix_mode,
            samples_per_epoch=c.samples_per_epoch,
            names=[s.name or f"{i}:{s.root}" for i, s in enumerate(self.sources)],
            on_error=c.on_error,
            max_skips=c.max_skips,
        )

    def _loader(self, ds: PlannedDataset, *, train: bool) -> ShardDataLoader:
        c = self.config
        pin = has_gpu() if c.pin_memory is None else c.pin_memory
        return ShardDataLoader(
            ds,
            c.batch_size,
            num_workers=c.num_workers,
            pin_memory=pin,
            drop_last=c.drop_last and train,
            persistent_workers=c.persistent_workers,
            prefetch_factor=c.prefetch_factor,
        )

    # --- LightningDataModule --------------------------------------------------------------
    def train_dataloader(self) -> ShardDataLoader:
        loader = self._loader(self.train_dataset(), train=True)
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        self._train_loader = loader
        return loader

    def _val_dataloader(self) -> ShardDataLoader:
        val = self.config.val
        src = val if isinstance(val, SourceConfig) else SourceConfig(val, split="val")
        patches = self._patches(src, self.config.val_patch_mode)
        return self._loader(self._dataset(src, patches, train=False), train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        transform = self.config.batch_transform
        return batch if transform is None else transform(batch)

    def count(self, n: int) -> None:
        """Called by the LightningModule when a batch of `n` samples reaches the training step."""
        self.used += n

    def state_dict(self) -> dict[str, Any]:
        loader = self._train_loader
        train = loader.state_dict() if loader is not None else self._pending
        return {"used": self.used, "train": train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = int(state.get("used", 0))
        if not state.get("train"):
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state["train"])
        else:
            self._pending = state["train"]
