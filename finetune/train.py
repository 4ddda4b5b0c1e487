"""`medfm finetune`: adapt a pretrained encoder to a labeled task and evaluate it honestly.

Model selection uses val only; the test split is scored once, at the end, with the weights of the
best val epoch. Everything the export needs lands in the run folder: `run.json` (what was trained
on what), `checkpoint/` (head, adapter or full encoder; safetensors only), `metrics.json` and a
ROC PNG (or segmentation overlays).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from medfm.finetune import hub
from medfm.models.contract import Contract
from medfm.shards import Manifest
from medfm.shards.mixing import RealizedRatio

from .config import FinetuneConfig
from .data import (
    Collate,
    check_label_table,
    contract_for,
    few_shot_keys,
    loader,
    row_targets,
    split_dataset,
    split_rows,
    with_synthetic,
)
from .encoder import BaseEncoder, load_base_encoder
from .metrics import choose_threshold, evaluate_predictions, score_split
from .model import FinetuneModel, apply_lora, build_head, param_groups

RUN_RECORD = "run.json"
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_loss(task_type: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y.float())
    if task_type == "multiclass":
        return F.cross_entropy(out, y)
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(out, y.float())
    if task_type == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)(out, y[:, None])
    return F.mse_loss(out.reshape(-1), y.float())


def build_model(base: BaseEncoder, cfg: FinetuneConfig) -> FinetuneModel:
    encoder = base.encoder
    head = build_head(encoder, cfg.task.type, cfg.task.label_names)
    if cfg.mode == "lora":
        encoder = apply_lora(encoder, cfg.lora, base.uri)
    elif cfg.mode == "linear_probe":
        encoder.requires_grad_(False)
    return FinetuneModel(encoder, head, cfg.task.type, cfg.task.pool)


def trainable_state(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters plus the head's buffers (BatchNorm stats)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        n: t.detach().clone()
        for n, t in model.state_dict().items()
        if n in trained or n.startswith("head.")
    }


def reset_norm_stats(module: torch.nn.Module) -> None:
    """Cumulative-average BatchNorms restart each epoch: their statistics then describe the
    encoder as it is now, not as it was at the start of training."""
    for m in module.modules():
        if isinstance(m, BATCH_NORMS) and m.momentum is None:
            m.reset_running_stats()


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


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, base_lr: float) -> None:
    """Linear warmup, then cosine decay to zero; each group keeps its layer-decay scale."""
    if step < warmup:
        scale = (step + 1) / warmup
    else:
        scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    for g in opt.param_groups:
        g["lr"] = base_lr * g["lr_scale"] * scale


@torch.no_grad()
def predict(
    fn: Callable, batches: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(outputs, targets, patient ids) over a loader yielding Collate's batches."""
    outs, ys, patients = [], [], []
    for x, y, p, *_ in batches:
        outs.append(fn(x.to(device)).float().cpu())
        ys.append(y)
        patients += p
    return torch.cat(outs), torch.cat(ys), patients


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


class Progress:
    """One line per epoch with rate and ETA (runs on real data are long)."""

    def __init__(self, epochs: int):
        self.epochs, self.start = epochs, time.time()

    def log(self, epoch: int, n: int, **values: float) -> None:
        per_epoch = (time.time() - self.start) / (epoch + 1)
        eta = per_epoch * (self.epochs - epoch - 1)
        fields = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        rate = n / max(per_epoch, 1e-9)
        print(
            f"epoch {epoch + 1}/{self.epochs} {fields} {rate:.1f} samples/s ETA {eta:.0f}s",
            flush=True,
        )


def fit_epochs(
    model: FinetuneModel,
    trained: torch.nn.Module,
    train_batches: Batches,
    evaluate: Callable[[], float],
    cfg: FinetuneConfig,
    device: torch.device,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """Train `trained` (the model, or just its head on cached features), score val each epoch
    with `evaluate` (higher is better) and restore the best epoch's weights at the end."""
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, cfg.mode, t.lr, t.weight_decay, t.layer_decay))
    total, warmup, step = t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch), 0
    best = {"score": -math.inf, "epoch": 0, "state": trainable_state(model)}
    history, progress = [], Progress(t.epochs)
    for epoch in range(t.epochs):
        trained.train()
        reset_norm_stats(model.head)
        losses, n = [], 0
        for x, y in train_batches():
            if len(x) == 1 and len(losses):
                # The heads' BatchNorm cannot train on one sample. Only an epoch's last, ragged
                # batch can be this small (the order is shuffled, so which sample is skipped
                # varies by epoch); it is skipped, as drop_last would, not crashed on.
                continue
            set_lr(opt, step, total, warmup, t.lr)
            loss = task_loss(cfg.task.type, trained(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n, step = n + len(x), step + 1
        score = evaluate()
        history.append(
            {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_score": score}
        )
        progress.log(epoch, n, loss=float(np.mean(losses)), val=score)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": trainable_state(model)}
    model.load_state_dict(best["state"], strict=False)
    return {"best_epoch": best["epoch"], "best_val_score": best["score"], "history": history}


def val_score(
    task_type: str, outputs: torch.Tensor, targets: torch.Tensor, patients: list[str], n: int
) -> float:
    """Higher is better: AUROC for classification, -MAE for regression (no bootstrap on val)."""
    m = evaluate_predictions(task_type, outputs, targets, patients, n, n_boot=1, ci=0.95)
    v = -m["mae"]["value"] if task_type == "regression" else m["auroc"]["value"]
    return v if math.isfinite(v) else -math.inf


def data_source(root: str, cfg: FinetuneConfig) -> dict[str, Any]:
    """Modality, spacing and channels of the fine-tuning data (part of the contract record)."""
    row = split_rows(root, "train", cfg)[0]
    return {
        "modality": row["modality"],
        "spacing": list(row["spacing"] or []),
        "channels": list(row["channels"] or []),
    }


def manifest_record(root: str) -> dict[str, Any]:
    h = Manifest.open(root).header
    return {
        "uri": root,
        "manifest_sha256": h["manifest"]["sha256"],
        "num_samples": h["num_samples"],
        "datasets": h.get("datasets", {}),
    }


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune, evaluate and write the run folder; returns its path."""
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.out_dir)
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.train.device)
    base = load_base_encoder(cfg.encoder)
    contract = contract_for(base.preprocessing, base.encoder, cfg)
    model = build_model(base, cfg).to(device)
    root = str(hub.resolve(cfg.data.shards))
    if cfg.task.type == "segmentation":
        from .segment import run_segmentation

        metrics, fit, sources = run_segmentation(model, root, contract, cfg, device, out)
    else:
        metrics, fit, sources = run_classification(model, root, contract, cfg, device, out)
    save_run(out, model, base, contract, cfg, metrics, fit, sources)
    return out


def run_classification(
    model: FinetuneModel,
    root: str,
    contract: Contract,
    cfg: FinetuneConfig,
    device: torch.device,
    out: Path,
):
    task, t = cfg.task, cfg.train
    train_rows = split_rows(root, "train", cfg)
    targets = row_targets(train_rows, task, root)
    keys = None
    if task.type != "regression":
        check_label_table(targets, task, f"{root} (train split)")
    if t.few_shot_k:
        keys = few_shot_keys(train_rows, targets, t.few_shot_k, t.seed, task)
        train_rows = [r for r in train_rows if r["key"] in keys]
    train_ds = split_dataset(root, "train", cfg, shuffle=True, keys=keys)
    sources = {"shards": manifest_record(root)}
    train_src: Any = train_ds
    if cfg.data.synthetic:
        syn_root = str(hub.resolve(cfg.data.synthetic.shards))
        syn_ds = split_dataset(syn_root, "train", cfg, shuffle=True)
        train_src = with_synthetic(train_ds, syn_ds, cfg.data.synthetic.ratio, t.seed)
        sources["synthetic"] = manifest_record(syn_root) | {"ratio": cfg.data.synthetic.ratio}
    collate = Collate(contract, task)
    dl = {"train": loader(train_src, collate, cfg)}
    # Counted from every batch the model sees (features once for a probe, else each epoch).
    share = RealizedRatio(cfg.data.synthetic.ratio) if cfg.data.synthetic else None
    if share is not None:
        dl["train"] = CountedBatches(dl["train"], share)
    for split in ("val", "test"):
        dl[split] = loader(split_dataset(root, split, cfg, shuffle=False), collate, cfg)
    n_labels = len(task.label_names)
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
            lambda: val_score(task.type, *head_eval("val"), n_labels),
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
            lambda: val_score(task.type, *predict(model.eval(), dl["val"], device), n_labels),
            cfg,
            device,
            len(dl["train"]),
        )
        test_out, test_y, test_p = predict(model.eval(), dl["test"], device)
    threshold = cfg.eval.threshold
    if isinstance(threshold, str):  # chosen on val with the restored best weights
        val = head_eval("val") if cfg.mode == "linear_probe" else predict(model, dl["val"], device)
        threshold = choose_threshold(val[0], val[1], threshold)
    roc = out / "roc.png" if cfg.eval.plots else None
    metrics = score_split(task, test_out, test_y, test_p, cfg.eval, threshold, roc)
    save_file({"outputs": test_out.contiguous()}, out / "test_outputs.safetensors")
    counts = {
        "train_rows": len(train_rows),
        "test": len(test_p),
        "test_patients": len(set(test_p)),
    }
    fit |= {"counts": counts, "threshold": threshold if task.type == "binary" else None}
    if share is not None:
        fit["synthetic"] = share.record()
        print(
            f"synthetic share of training samples: {share.ratio:.3f} (target {share.target}, "
            f"+-{share.tolerance():.3f} at 4 s.e., {share.total} samples)",
            flush=True,
        )
    return metrics, fit, sources


def save_run(
    out: Path,
    model: FinetuneModel,
    base: BaseEncoder,
    contract: Contract,
    cfg: FinetuneConfig,
    metrics: dict,
    fit: dict,
    sources: dict,
) -> None:
    ckpt = out / "checkpoint"
    save_file(
        {k: v.contiguous() for k, v in model.head.state_dict().items()}, ckpt / "head.safetensors"
    )
    if cfg.mode == "lora":
        with warnings.catch_warnings():  # PEFT looks for an HF config.json beside the base
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.encoder.save_pretrained(ckpt / "adapter")
    elif cfg.mode == "full":
        enc = model.base_encoder()
        save_file(
            {k: v.contiguous() for k, v in enc.state_dict().items()}, ckpt / "encoder.safetensors"
        )
    record = {
        "name": cfg.name,
        "mode": cfg.mode,
        "task": {
            "type": cfg.task.type,
            "label_key": cfg.task.label_key,
            "label_names": cfg.task.label_names,
            "label_values": cfg.task.label_values,
            "pool": cfg.task.pool,
        },
        "base_encoder": {
            "uri": base.uri,
            "sha256": base.sha256,
            "architecture": base.architecture,
            "pretraining_data": base.manifests,
        },
        "preprocessing": contract.describe()
        | {
            "pretraining_source": base.preprocessing.get("source", {}),
            "finetuning_source": data_source(sources["shards"]["uri"], cfg),
        },
        "data": sources,
        "metrics": {
            "split": "test",
            "ci": cfg.eval.ci,
            "bootstrap": cfg.eval.bootstrap,
            "resampling_unit": "patient",
            "values": metrics,
        },
        "fit": fit,
        "config": cfg.to_dict(),
    }
    (out / RUN_RECORD).write_text(json.dumps(record, indent=1))
    summary = {
        "task": cfg.task.type,
        "mode": cfg.mode,
        "split": "test",
        "ci": cfg.eval.ci,
        "resampling_unit": "patient",
        "threshold": fit.get("threshold"),
        "metrics": metrics,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
