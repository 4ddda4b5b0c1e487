"""Segmentation fine-tuning over 3D volumes (patches) and 2D images (whole images).

3D: training patches (foreground-weighted) and inference windows (grid) both come from
`PatchSampler`, so only the Zarr chunks a patch touches are read. Window logits are averaged where
windows overlap; a case is scored (Dice, IoU, HD95, NSD) as soon as its last window is in, so at
most one full-size buffer per volume in flight is held.
2D: images are resized to the encoder's input size by its contract (label maps by nearest
neighbour); predictions are resized back and scored at the stored resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.io import save_figure
from medfm.models.contract import Contract
from medfm.shards import Manifest, open_volume
from medfm.shards.patches import PatchSampler

from .data import Collate, loader, manifest_record, split_dataset, split_rows
from .fit import fit_epochs
from .model import FinetuneModel

if TYPE_CHECKING:
    from .config import FinetuneConfig
    from .tasks.segmentation import Segmentation

# (patient id, spacing, prediction, label, overlay maker) per scored case
Case = tuple[str, tuple[float, ...], torch.Tensor, torch.Tensor, Callable[[], tuple]]


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
    """Sliding-window predictions of every volume of a split, from PatchSampler grid windows."""
    task = model.task
    lut, n_cls = task.lut, len(task.label_names)
    grid = PatchSampler(root, contract.patch_size, mode="grid", overlap=cfg.task.overlap)
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
            shape = tuple(row["shape"])
            if it["key"] not in acc:
                acc[it["key"]] = [
                    torch.zeros(n_cls, *shape),
                    torch.zeros(shape),
                    grid.units_for(row),
                ]
            total, count, _ = acc[it["key"]]
            start = it["meta"]["patch_start"]
            region = tuple(
                slice(s, min(s + p, d))
                for s, p, d in zip(start, contract.patch_size, shape, strict=True)
            )
            crop = tuple(slice(0, r.stop - r.start) for r in region)
            total[(slice(None), *region)] += out[(slice(None), *crop)]
            count[region] += 1
            acc[it["key"]][2] -= 1
            if acc[it["key"]][2] == 0:
                pred = (total / count.clamp_min(1)).argmax(0)
                vol = open_volume(m.fs, m.path, row)
                label = torch.from_numpy(lut[np.asarray(vol.label[...])])
                del acc[it["key"]]
                yield (
                    _patient(row),
                    tuple(row["spacing"]),
                    pred,
                    label,
                    _volume_overlay(vol, pred, label),
                )


def _volume_overlay(vol, pred: torch.Tensor, label: torch.Tensor) -> Callable[[], tuple]:
    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = int(label.flatten(0, 1).count_nonzero(0).argmax())  # slice with most foreground
        image = np.asarray(vol.image[:, :, k], dtype=np.float32)
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

    fig, axes = plt.subplots(len(examples), 2, figsize=(6, 3 * len(examples)), squeeze=False)
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
    sampler = PatchSampler(
        root,
        contract.patch_size,
        mode="foreground",
        foreground_fraction=0.67,
        patches_per_volume=t.patches_per_volume,
        seed=t.seed,
    )
    return split_dataset(root, "train", cfg, shuffle=True, patches=sampler, kinds="volume3d")


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
    return metrics, fit, {"shards": manifest_record(root)}
