"""The fine-tuning run of tasks with one target per sample (classification, multi-label,
regression): targets from the manifest's labels, a linear head on the pooled embedding, trained
on cached features (linear probe) or end to end (LoRA, full), scored on test once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from medfm.finetune import hub
from medfm.io import save_safetensors
from medfm.shards import check_synthetic, check_training_set
from medfm.shards.mixing import RealizedRatio

from .data import (
    Collate,
    loader,
    manifest_record,
    row_targets,
    split_dataset,
    split_rows,
    with_synthetic,
)
from .fit import fit_epochs, predict
from .model import FinetuneModel

if TYPE_CHECKING:
    from medfm.models.contract import Contract

    from .config import FinetuneConfig
    from .tasks import SampleTask


def augment_2d(x: torch.Tensor, shift: int, scale: float) -> torch.Tensor:
    """Random zoom (1 +- scale) and shift (+- shift pixels) per image, edge-padded: bilinear
    resampling through one affine grid, so it costs little next to the encoder."""
    b, _, h, w = x.shape
    s = 1 + (torch.rand(b) * 2 - 1) * scale
    t = torch.randint(-shift, shift + 1, (b, 2)).float() * 2 / torch.tensor([w, h])
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / s, 1 / s, t
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class CountedBatches:
    """A loader whose batches' synthetic flags are counted into a RealizedRatio as they pass."""

    def __init__(self, batches: Any, share: RealizedRatio):
        self.batches, self.share = batches, share

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.share.update(batch[3])
            yield batch


def run_samples(
    task: SampleTask,
    model: FinetuneModel,
    root: str,
    contract: Contract,
    cfg: FinetuneConfig,
    device: torch.device,
    out: Path,
) -> tuple[dict, dict, dict]:
    """Train, keep the best val epoch, score test once: (metrics, fit record, sources)."""
    t = cfg.train
    syn = cfg.data.synthetic
    if syn:  # the audit gate, before any sample is read
        syn = replace(syn, shards=str(hub.resolve(syn.shards)))
        audit = check_synthetic(syn)
    direct = check_training_set(root, cfg.data.allow_unaudited)
    train_rows = split_rows(root, "train", cfg)
    targets = row_targets(train_rows, task, root)
    keys = None
    task.check_train_targets(targets, f"{root} (train split)")
    if t.few_shot_k:
        keys = task.few_shot_keys(train_rows, targets, t.few_shot_k, t.seed)
        train_rows = split_rows(root, "train", cfg, keys=keys)
    train_ds = split_dataset(root, "train", cfg, shuffle=True, keys=keys)
    sources = {"shards": manifest_record(root)}
    if direct:
        sources["shards"]["synthetic_audit"] = direct
    train_src: Any = train_ds
    if syn:
        syn_ds = split_dataset(syn.shards, "train", cfg, shuffle=True)
        train_src = with_synthetic(train_ds, syn_ds, syn.ratio, t.seed)
        sources["synthetic"] = manifest_record(syn.shards) | {"ratio": syn.ratio} | audit
    collate = Collate(contract, task)
    dl = {"train": loader(train_src, collate, cfg)}
    # Counted from every batch the model sees (features once for a probe, else each epoch).
    share = RealizedRatio(syn.ratio) if syn else None
    if share is not None:
        dl["train"] = CountedBatches(dl["train"], share)
    for split in ("val", "test"):
        dl[split] = loader(split_dataset(root, split, cfg, shuffle=False), collate, cfg)
    if cfg.mode == "linear_probe":
        # Frozen encoder: embed every image once, then train the head on cached features.
        model.eval()
        feats = {k: predict(model.features, v, device) for k, v in dl.items()}
        g = torch.Generator().manual_seed(t.seed)
        train_feats = DataLoader(
            TensorDataset(*feats["train"][:2]),
            batch_size=cfg.data.batch_size,
            shuffle=True,
            generator=g,
        )

        def head_eval(split: str):
            f, y, p = feats[split]
            model.head.eval()
            with torch.no_grad():
                return model.head(f.to(device)).float().cpu(), y, p

        fit = fit_epochs(
            model,
            model.head,
            lambda: train_feats,
            lambda: task.val_score(*head_eval("val")),
            cfg,
            device,
            len(train_feats),
        )
        test_out, test_y, test_p = head_eval("test")
    else:
        aug = t.augment_shift or t.augment_scale
        fit = fit_epochs(
            model,
            model,
            lambda: (
                (augment_2d(x, t.augment_shift, t.augment_scale) if aug and x.ndim == 4 else x, y)
                for x, y, *_ in dl["train"]
            ),
            lambda: task.val_score(*predict(model.eval(), dl["val"], device)),
            cfg,
            device,
            len(dl["train"]),
        )
        test_out, test_y, test_p = predict(model.eval(), dl["test"], device)

    def val_outputs() -> tuple[torch.Tensor, torch.Tensor]:  # with the restored best weights
        val = head_eval("val") if cfg.mode == "linear_probe" else predict(model, dl["val"], device)
        return val[0], val[1]

    threshold = task.decision_threshold(cfg.eval.threshold, val_outputs)
    roc = out / "roc.png" if cfg.eval.plots else None
    metrics = task.score(test_out, test_y, test_p, cfg.eval, threshold, roc)
    save_safetensors(out / "test_outputs.safetensors", {"outputs": test_out.contiguous()})
    counts = {
        "train_rows": len(train_rows),
        "test": len(test_p),
        "test_patients": len(set(test_p)),
    }
    fit |= {"counts": counts, "threshold": threshold}
    if share is not None:
        fit["synthetic"] = share.record()
        print(
            f"synthetic share of training samples: {share.ratio:.3f} (target {share.target}, "
            f"+-{share.tolerance():.3f} at 4 s.e., {share.total} samples)",
            flush=True,
        )
    return metrics, fit, sources
