"""ShardDataModule: train/val loaders over shard sets from one small config, resumable in Lightning.

Its `state_dict` (saved in every Lightning checkpoint) is the training loader's position, so a
checkpoint written mid-epoch resumes with exactly the samples the run had not trained on, in the
same order, on `fit(ckpt_path=...)`. The loader counts the batches it has handed out; Lightning
fetches no batch ahead from a loader with a length (ours always have one), so that count is what
the training steps consumed - tests/test_readers_datamodule.py checks it in a real fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

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
    name: str | None = None


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
    drop_last: bool = False
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
        self._train_loader: ShardDataLoader | None = None
        self._pending: dict[str, Any] | None = None

    # --- datasets -------------------------------------------------------------------------
    def _patches(self, root: str, mode: str) -> PatchSampler | None:
        c = self.config
        if c.patch_size is None:
            return None
        return PatchSampler(
            root,
            c.patch_size,
            units=c.patch_units,
            mode=mode,
            foreground_fraction=c.foreground_fraction,
            seed=c.seed,
            patches_per_volume=c.patches_per_volume if mode != "grid" else 1,
            cache_dir=c.patch_cache_dir,
            storage_options=c.storage_options,
        )

    def _dataset(self, src: SourceConfig, *, train: bool) -> ShardDataset:
        c = self.config
        return ShardDataset(
            src.root,
            split=src.split,
            kinds=src.kinds,
            modalities=src.modalities,
            datasets=src.datasets,
            synthetic=src.synthetic,
            shuffle=train,
            seed=c.seed,
            buffer_size=c.buffer_size,
            transform=c.train_transform if train else c.val_transform,
            patches=self._patches(src.root, c.patch_mode if train else c.val_patch_mode),
            drop_last=c.drop_last and train,
            on_error=c.on_error,
            max_skips=c.max_skips,
            name=src.name,
            storage_options=c.storage_options,
        )

    def train_dataset(self) -> PlannedDataset:
        c = self.config
        sources = c.train_sources()
        if len(sources) == 1:
            return self._dataset(sources[0], train=True)
        datasets = {self._dataset(s, train=True): s.weight for s in sources}
        return MixedDataset(
            datasets,
            seed=c.seed,
            mode=c.mix_mode,
            samples_per_epoch=c.samples_per_epoch,
            names=[s.name or f"{i}:{s.root}" for i, s in enumerate(sources)],
            on_error=c.on_error,
            max_skips=c.max_skips,
        )

    def _loader(self, ds: PlannedDataset) -> ShardDataLoader:
        c = self.config
        pin = torch.cuda.is_available() if c.pin_memory is None else c.pin_memory
        return ShardDataLoader(
            ds,
            c.batch_size,
            num_workers=c.num_workers,
            pin_memory=pin,
            persistent_workers=c.persistent_workers,
            prefetch_factor=c.prefetch_factor,
        )

    # --- LightningDataModule --------------------------------------------------------------
    def train_dataloader(self) -> ShardDataLoader:
        loader = self._loader(self.train_dataset())
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> ShardDataLoader | list:
        val = self.config.val
        if val is None:
            return []
        src = val if isinstance(val, SourceConfig) else SourceConfig(val, split="val")
        return self._loader(self._dataset(src, train=False))

    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train": self._train_loader.state_dict()}
        return {"train": self._pending} if self._pending else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("train"):
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state["train"])
        else:
            self._pending = state["train"]
