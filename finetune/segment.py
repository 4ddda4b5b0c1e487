"""Segmentation fine-tuning over 3D volumes (patches) and 2D images (whole images).

3D: training patches (foreground-weighted) and inference windows (grid) both come from
`PatchSampler`, so only the Zarr chunks a patch touches are read. Window logits are averaged where
windows overlap; a case is scored (Dice, IoU, HD95, NSD) as soon as its last window is in, so at
most one full-size buffer per volume in flight is held.
2D: images are resized to the encoder's input size by its contract (label maps by nearest
neighbour); predictions are resized back and scored at the stored resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.config import ConfigError
from medfm.io import save_figure
from medfm.models.contract import Contract
from medfm.shards import Manifest, open_volume
from medfm.shards.patches import PatchSampler, grid_starts
from medfm.shards.sampleio import read_region

from .data import Collate, loader, manifest_record, split_dataset, split_rows
from .fit import fit_epochs
from .model import FinetuneModel

if TYPE_CHECKING:
    from .config import FinetuneConfig, RegionSplitConfig
    from .tasks.segmentation import Segmentation

# (patient id, spacing, prediction, label, overlay maker) per scored case
Case = tuple[str, tuple[float, ...], torch.Tensor, torch.Tensor, Callable[[], tuple]]
Box = tuple[slice, slice, slice]


def region_gap(rs: RegionSplitConfig, patch: tuple[int, ...]) -> int:
    """The gap between slabs: as configured, or the patch's extent along the axis, which is
    also its floor."""
    extent = int(patch[rs.axis])
    gap = extent if rs.gap is None else rs.gap
    if gap < extent:
        raise ConfigError(
            f"task.region_split.gap: {gap} voxels is less than the patch's {extent} along axis "
            f"{rs.axis}; a window at a slab's face would have the next slab within reach"
        )
    return gap


def slab_bounds(length: int, rs: RegionSplitConfig, gap: int) -> dict[str, tuple[int, int]]:
    """[start, stop) of each split's slab along an axis `length` voxels long: the slabs in the
    configured order, `gap` voxels between neighbours, the rest shared by the fractions."""
    usable = length - gap * (len(rs.slabs) - 1)
    cuts = np.round(np.cumsum([0.0, *rs.slabs.values()]) * usable).astype(int)
    bounds = {
        split: (int(cuts[i]) + i * gap, int(cuts[i + 1]) + i * gap)
        for i, split in enumerate(rs.slabs)
    }
    if min(hi - lo for lo, hi in bounds.values()) < 1:
        raise ValueError(
            f"task.region_split: {length} voxels along axis {rs.axis} leave a slab empty with "
            f"gaps of {gap} and fractions {rs.slabs}"
        )
    return bounds


class SlabBox:
    """The voxels of a volume that one split may use: the whole volume, or its slab along
    task.region_split's axis. A class, not a closure: loader workers pickle the sampler."""

    def __init__(self, cfg: FinetuneConfig, split: str, patch: tuple[int, ...]):
        self.rs, self.split = cfg.task.region_split, split
        self.gap = region_gap(self.rs, patch) if self.rs is not None else 0

    def bounds(self, row: dict[str, Any]) -> dict[str, tuple[int, int]]:
        return slab_bounds(int(row["shape"][self.rs.axis]), self.rs, self.gap)

    def __call__(self, row: dict[str, Any]) -> Box:
        box = [slice(0, int(n)) for n in row["shape"]]
        if self.rs is not None:
            box[self.rs.axis] = slice(*self.bounds(row)[self.split])
        return tuple(box)


class SlabSampler(PatchSampler):
    """A PatchSampler held inside one box of each volume (`SlabBox`): grid windows tile the
    box, random and foreground-centred patches start inside it, and a patch reads only voxels
    of the box (padding makes up the rest where the box is thinner than the patch). So no
    training patch holds a val or test voxel, and no scored window a train voxel."""

    def __init__(
        self,
        root: str,
        patch_size: tuple[int, ...],
        box: SlabBox,
        classes: frozenset[int] = frozenset(),
        **kwargs: Any,
    ):
        super().__init__(root, patch_size, **kwargs)
        self.box, self.classes = box, classes
        self._inside: dict[tuple, dict[int, np.ndarray]] = {}  # (label sha, lo, hi)

    def windows(self, row: dict[str, Any]) -> list[tuple[int, int, int]]:
        size = self.voxel_size(row)
        axes = [
            [b.start + s for s in grid_starts(b.stop - b.start, p, self.overlap)]
            for b, p in zip(self.box(row), size, strict=True)
        ]
        return [(i, j, k) for i in axes[0] for j in axes[1] for k in axes[2]]

    def patch(
        self, row: dict[str, Any], sub: int, rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        vol, size, box = self.reader().open(row), self.voxel_size(row), self.box(row)
        if self.mode == "grid":
            start = self.windows(row)[sub]
        else:
            rng = rng if rng is not None else np.random.default_rng(self.seed)
            centre = None
            if self.mode == "foreground" and vol.label is not None:
                if rng.random() < self.foreground_fraction:
                    centre = self._centre_inside(row, vol.label, box, rng)
            start = self._start_inside(box, size, centre, rng)
        region = tuple(
            slice(s, min(s + p, b.stop)) for s, p, b in zip(start, size, box, strict=True)
        )
        image = self._pad(read_region(vol.image, row["shard"], region), size, self.pad_value)
        out = {"image": image, "start": start, "size": size}
        if vol.label is not None:
            out["label"] = self._pad(read_region(vol.label, row["shard"], region), size, 0)
        return out

    @staticmethod
    def _start_inside(box: Box, size, centre, rng) -> tuple[int, int, int]:
        hi = [max(b.start, b.stop - p) for b, p in zip(box, size, strict=True)]
        if centre is None:
            return tuple(int(rng.integers(b.start, h + 1)) for b, h in zip(box, hi, strict=True))
        return tuple(
            int(min(max(c - p // 2, b.start), h))
            for c, p, b, h in zip(centre, size, box, hi, strict=True)
        )

    def _centre_inside(self, row, label, box: Box, rng) -> tuple[int, int, int] | None:
        """nnU-Net's rule (a present class uniformly, then one of its voxels), among the
        foreground voxels inside the box of the task's classes (`classes`, if given): a label
        map with 40 structures would otherwise centre one patch in 40 on the one trained."""
        lo, hi = tuple(b.start for b in box), tuple(b.stop for b in box)
        key = (json.loads(row["members"])["label"]["sha256"], lo, hi)
        if key not in self._inside:
            locs = {
                c: v[np.all((v >= lo) & (v < hi), axis=1)]
                for c, v in self.foreground(row, label).items()
                if not self.classes or c in self.classes
            }
            self._inside[key] = {c: v for c, v in locs.items() if len(v)}
        locs = self._inside[key]
        if not locs:
            return None
        cls = sorted(locs)[int(rng.integers(len(locs)))]
        return tuple(int(v) for v in locs[cls][int(rng.integers(len(locs[cls])))])


def sampler(
    root: str, contract: Contract, cfg: FinetuneConfig, split: str, **kwargs: Any
) -> PatchSampler:
    """The split's patch sampler: held to its slab under task.region_split (else the box is the
    whole volume), foreground patches centred on the task's own classes."""
    values = cfg.task.label_values or list(range(len(cfg.task.label_names)))
    box = SlabBox(cfg, split, contract.patch_size)
    return SlabSampler(root, contract.patch_size, box, frozenset(values[1:]), **kwargs)


def _batches(items, size: int):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _patient(meta: dict[str, Any]) -> str:
    return f"{meta['dataset']}/{meta['patient_id']}"


@torch.no_grad()
def volume_cases(
    model, root: str, split: str, contract: Contract, cfg: FinetuneConfig, device
) -> Iterator[Case]:
    """Sliding-window predictions of every volume of a split (of its slab, under
    task.region_split), from the sampler's grid windows."""
    task = model.task
    lut, n_cls = task.lut, len(task.label_names)
    grid = sampler(root, contract, cfg, split, mode="grid", overlap=cfg.task.overlap)
    ds = split_dataset(root, split, cfg, shuffle=False, patches=grid, kinds="volume3d")
    rows = {r["key"]: r for r in split_rows(root, split, cfg, "volume3d")}
    m = Manifest.open(root)
    collate = Collate(contract, task)
    acc: dict[str, list[Any]] = {}
    model.eval()
    for batch in _batches(ds, cfg.data.batch_size):
        logits = model(torch.stack([collate.input(it) for it in batch]).to(device)).float().cpu()
        for it, out in zip(batch, logits, strict=True):
            row = rows[it["key"]]
            box = grid.box(row)
            shape = tuple(b.stop - b.start for b in box)
            if it["key"] not in acc:
                acc[it["key"]] = [
                    torch.zeros(n_cls, *shape),
                    torch.zeros(shape),
                    grid.units_for(row),
                ]
            total, count, _ = acc[it["key"]]
            # The window's place in the box's buffers, cut where it leaves the box.
            at = [s - b.start for s, b in zip(it["meta"]["patch_start"], box, strict=True)]
            region = tuple(
                slice(a, min(a + p, n))
                for a, p, n in zip(at, contract.patch_size, shape, strict=True)
            )
            crop = tuple(slice(0, r.stop - r.start) for r in region)
            total[(slice(None), *region)] += out[(slice(None), *crop)]
            count[region] += 1
            acc[it["key"]][2] -= 1
            if acc[it["key"]][2] == 0:
                pred = (total / count.clamp_min(1)).argmax(0)
                vol = open_volume(m.fs, m.path, row)
                label = torch.from_numpy(lut[np.asarray(read_region(vol.label, row["shard"], box))])
                del acc[it["key"]]
                yield from _blocks(cfg, row, vol, box, pred, label)


def _blocks(cfg: FinetuneConfig, row, vol, box: Box, pred, label) -> Iterator[Case]:
    """One scored case per volume, or task.region_split.blocks consecutive blocks of its slab
    (each its own case for the bootstrap, named after the volume's patient and the block)."""
    rs = cfg.task.region_split
    n = rs.blocks if rs is not None else 1
    axis = 0 if rs is None else rs.axis if rs.blocks_axis is None else rs.blocks_axis
    edges = np.linspace(0, pred.shape[axis], n + 1).round().astype(int)
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        part = [slice(None)] * 3
        part[axis] = slice(int(lo), int(hi))
        sub = list(box)
        sub[axis] = slice(box[axis].start + int(lo), box[axis].start + int(hi))
        p, y = pred[tuple(part)], label[tuple(part)]
        who = _patient(row) if n == 1 else f"{_patient(row)}/block{b}"
        yield who, tuple(row["spacing"]), p, y, _volume_overlay(vol, row, tuple(sub), p, y)


def _volume_overlay(vol, row, box: Box, pred: torch.Tensor, label: torch.Tensor):
    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = int(label.flatten(0, 1).count_nonzero(0).argmax())  # slice with most foreground
        at = (box[0], box[1], slice(box[2].start + k, box[2].start + k + 1))
        image = np.asarray(read_region(vol.image, row["shard"], at), dtype=np.float32)[:, :, 0]
        return image, label[:, :, k].numpy(), pred[:, :, k].numpy()

    return make


@torch.no_grad()
def image_cases(
    model, root: str, split: str, contract: Contract, cfg: FinetuneConfig, device
) -> Iterator[Case]:
    """Whole-image predictions, resized back to each image's stored size."""
    task = model.task
    ds = split_dataset(root, split, cfg, shuffle=False, kinds="image2d")
    collate = Collate(contract, task)
    model.eval()
    for batch in _batches(ds, cfg.data.batch_size):
        logits = model(torch.stack([collate.input(it) for it in batch]).to(device)).float().cpu()
        for it, out in zip(batch, logits, strict=True):
            label = task.label_classes(it, contract)
            size = tuple(label.shape)
            pred = F.interpolate(out[None], size=size, mode="bilinear")[0].argmax(0)
            image = it["data"].float().mean(0).numpy()
            spacing = tuple(it["meta"]["spacing"] or (1.0, 1.0))
            yield (
                _patient(it["meta"]),
                spacing,
                pred,
                label,
                lambda i=image, y=label, p=pred: (i, y.numpy(), p.numpy()),
            )


def score_split(
    model, root, split, contract, cfg, device, full: bool, examples: list | None = None
):
    """Per-case metrics and patient ids of a split (Dice only unless `full`)."""
    cases, patients = [], []
    source = volume_cases if contract.kind == "volume3d" else image_cases
    for patient, spacing, pred, label, overlay in source(model, root, split, contract, cfg, device):
        cases.append(model.task.case_metrics(pred, label, spacing, cfg.eval, full))
        patients.append(patient)
        if examples is not None and len(examples) < 3:
            examples.append(overlay())
    return cases, patients


def plot_overlays(examples: list, path: Path, dice: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aspect = examples[0][0].shape[1] / examples[0][0].shape[0]  # a slab's slices are flat
    row_h = 3 * min(1.0, aspect) + 0.4
    fig, axes = plt.subplots(len(examples), 2, figsize=(6, row_h * len(examples)), squeeze=False)
    for row, (image, label, pred) in zip(axes, examples, strict=True):
        for ax, mask, title in ((row[0], label, "ground truth"), (row[1], pred, "prediction")):
            ax.imshow(image.T, cmap="gray", origin="lower")
            ax.imshow(
                np.ma.masked_equal(mask.T, 0),
                cmap="tab20",
                alpha=0.5,
                origin="lower",
                interpolation="nearest",
            )
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"test Dice {dice:.3f}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def train_dataset(root: str, contract: Contract, cfg: FinetuneConfig):
    """3D: foreground-weighted random patches; 2D: whole images."""
    if contract.kind != "volume3d":
        return split_dataset(root, "train", cfg, shuffle=True, kinds="image2d")
    t = cfg.train
    patches = sampler(
        root,
        contract,
        cfg,
        "train",
        mode="foreground",
        foreground_fraction=0.67,
        patches_per_volume=t.patches_per_volume,
        seed=t.seed,
    )
    return split_dataset(root, "train", cfg, shuffle=True, patches=patches, kinds="volume3d")


def run_segmentation(
    task: Segmentation,
    model: FinetuneModel,
    root: str,
    contract: Contract,
    cfg: FinetuneConfig,
    device: torch.device,
    out: Path,
) -> tuple[dict, dict, dict]:
    """Train, keep the best val epoch (Dice), score test once: (metrics, fit, sources)."""
    if cfg.task.region_split is not None and contract.kind != "volume3d":
        raise ConfigError("task.region_split: slabs of volumes; this encoder takes 2D images")
    train_rows = split_rows(root, "train", cfg, contract.kind)
    unlabeled = [r["key"] for r in train_rows if not r["has_label_map"]]
    if unlabeled:
        raise ValueError(f"{root}: train samples without a label map: {unlabeled[:5]}")
    dl = loader(train_dataset(root, contract, cfg), Collate(contract, task), cfg)

    def val_dice() -> float:
        return task.val_score(score_split(model, root, "val", contract, cfg, device, full=False)[0])

    fit = fit_epochs(
        model, model, lambda: ((x, y) for x, y, *_ in dl), val_dice, cfg, device, len(dl)
    )
    examples: list = []
    cases, patients = score_split(
        model, root, "test", contract, cfg, device, full=True, examples=examples
    )
    metrics = task.metrics(cases, patients, cfg.eval)
    if cfg.eval.plots and examples:
        plot_overlays(examples, out / "seg_overlays.png", metrics["dice"]["value"])
    fit["counts"] = {"train_samples": len(train_rows), "test_cases": len(cases)}
    if cfg.task.region_split is not None:
        fit["slabs"] = slab_record(train_rows, cfg, contract)
    return metrics, fit, {"shards": manifest_record(root)}


def slab_record(rows: list[dict[str, Any]], cfg: FinetuneConfig, contract: Contract) -> dict:
    """{volume key: {"axis", "gap", split: [start, stop]}}: where each split's slab lies."""
    box = SlabBox(cfg, "train", contract.patch_size)
    return {
        r["key"]: {"axis": box.rs.axis, "gap": box.gap}
        | {k: list(v) for k, v in box.bounds(r).items()}
        for r in rows
    }


def evaluate_segmentation(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    split: str = "test",
    overlay_png: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Dice, IoU, HD95 and NSD (with bootstrap CIs) of a loaded export on a split (its slab
    under task.region_split), preprocessed by the export's contract; `n` is the cases scored."""
    examples: list = []
    cases, patients = score_split(
        model, cfg.data.shards, split, model.contract, cfg, torch.device(device), True, examples
    )
    if not cases:
        raise ValueError(f"{cfg.data.shards}: no {split!r} volumes to evaluate on")
    metrics = model.task.metrics(cases, patients, cfg.eval)
    if overlay_png and examples:
        plot_overlays(examples, Path(overlay_png), metrics["dice"]["value"])
    return metrics | {"n": len(cases)}
