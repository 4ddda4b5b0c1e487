"""Learning-quality benchmark: PneumoniaMNIST against the MedMNIST v2 paper.

    MEDFM_SAMPLE_DATA=/work/shared/data python bench/learning.py [--quick] [--out DIR]

What it does, every step through the medfm stage APIs:

1. Writes the official split (train 4,708 / val 524 / test 624) as medfm shard sets, one per
   label fraction. The 1% and 10% train subsets are stratified draws by one seed, nested
   (1% is inside 10%), so the fractions differ only in how many labels there are.
2. Pretrains a small ViT with MAE on the train images, labels unused (medfm.pretrain).
3. Trains a class-conditional diffusion model per small label budget on *that budget's* labeled
   images only (the generator never sees a label the classifier may not), and samples a
   synthetic shard set from it (medfm.synth).
4. Fine-tunes (medfm.finetune): linear probe, LoRA and full FT of the MAE encoder, full FT of the
   same architecture from random init, and full FT with synthetic images mixed in at 1% and 10%.
   Best epoch and decision threshold come from val; test is scored once per cell.

Prints and writes one JSON line per cell (`learning.jsonl`) and `learning_auc.png` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The box is small and shared: one compute thread is faster than two fighting (measured).
torch.set_num_threads(1)

# MedMNIST v2 (Yang et al., Sci. Data 2023), Table: PneumoniaMNIST test AUC / ACC.
PAPER = {
    "ResNet-18 (28)": (0.944, 0.854),
    "ResNet-50 (224)": (0.962, 0.884),
    "Google AutoML Vision": (0.991, 0.946),
}
LABELS = ["normal", "pneumonia"]


@dataclass
class Recipe:
    """Everything tunable in one place (tuned on val only, see docs/results.md)."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    synthetic_fractions: tuple[float, ...] = (0.01, 0.1)
    # A small ViT: patch 4 on 28x28 gives 49 tokens, dim 64 x 4 blocks is what 2 CPU cores
    # can fine-tune ~14 times in the time budget.
    encoder: tuple[tuple[str, Any], ...] = (
        ("embed_dim", 64), ("depth", 4), ("num_heads", 4), ("patch_size", 4),
    )  # fmt: skip
    mae_steps: int = 1200  # x 128 = 33 epochs of the 4,708 train images
    mae_batch: int = 128
    diffusion_steps: int = 400
    synthetic_n: int = 256  # pool; each epoch draws `synthetic_ratio` of its samples from it
    synthetic_ratio: float = 0.5
    sampler_steps: int = 20
    # Per label fraction: epochs and batch size. Val is scored every epoch (that is how the
    # best epoch is chosen), so small fractions get small batches rather than many epochs.
    epochs: tuple[tuple[float, int], ...] = ((0.01, 25), (0.1, 15), (1.0, 8))
    batch: tuple[tuple[float, int], ...] = ((0.01, 8), (0.1, 16), (1.0, 64))
    probe_epochs: int = 100
    bootstrap: int = 1000
    workers: int = 1  # one loader process decodes while the main one computes
    seed: int = 0


QUICK = Recipe(
    fractions=(0.1,), synthetic_fractions=(0.1,), mae_steps=10, diffusion_steps=5,
    synthetic_n=16, sampler_steps=4, epochs=((0.1, 1),), probe_epochs=5, bootstrap=100, workers=0,
)  # fmt: skip


def write_shards(npz: Path, root: Path, fraction: float, seed: int) -> Path:
    """The official split as a shard set, train labels cut to a stratified `fraction`.

    MedMNIST carries no patient ids, so each image is its own pseudonymous patient (the
    bootstrap then resamples images)."""
    if (root / "manifest.json").exists():
        return root
    from medfm.shards import Sample, ShardSetWriter

    z = np.load(npz)
    keep = np.zeros(len(z["train_labels"]), bool)
    y = z["train_labels"].reshape(-1)
    rng = np.random.default_rng(seed)
    for c in (0, 1):  # one permutation per class: smaller fractions are prefixes (nested)
        idx = rng.permutation(np.flatnonzero(y == c))
        keep[idx[: max(1, round(fraction * len(idx)))]] = True
    with ShardSetWriter(str(root)) as w:
        for split in ("train", "val", "test"):
            labels = z[f"{split}_labels"].reshape(-1)
            for i, img in enumerate(z[f"{split}_images"]):
                if split == "train" and not keep[i]:
                    continue
                w.write(Sample(
                    key=f"pm-{split}-{i:05d}", kind="image2d", modality="DX",
                    dataset="pneumoniamnist", patient_id=f"{split}{i}", split=split, data=img,
                    labels={"label": int(labels[i])}, licence="CC BY 4.0",
                ))  # fmt: skip
        w.close(datasets={"pneumoniamnist": {"licence": "CC BY 4.0", "source": "MedMNIST v2"}})
    return root


def pretrain_mae(shards: Path, out: Path, r: Recipe) -> Path:
    """MAE on the train images (labels unused); returns the export folder."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    if (out / "export" / "encoder.json").exists():
        return out / "export"
    cfg = load_config(None, base={
        "name": "bench-mae", "out_dir": str(out),
        "data": {"shards": str(shards), "split": "train", "kinds": ["image2d"],
                 "batch_size": r.mae_batch, "num_workers": r.workers},
        "model": {"name": "vit2d", "size": "tiny", "img_size": 28, "in_chans": 1,
                  **dict(r.encoder)},
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "decoder_dim": 64,
                        "decoder_depth": 2, "decoder_heads": 4}],
        "train": {"max_steps": r.mae_steps, "lr": 1.5e-3, "warmup_steps": r.mae_steps // 20,
                  "weight_decay": 0.05, "checkpoint_every": 10**6, "log_every": 200,
                  "plots": False, "loggers": ["csv"], "seed": r.seed},
    })  # fmt: skip
    return Path(run(cfg)["export"]).parent


def random_encoder(mae_export: Path, out: Path, seed: int) -> Path:
    """The same architecture and preprocessing contract, randomly initialised (baseline)."""
    from medfm.models import build_encoder
    from medfm.models.export import export_encoder

    side = json.loads((mae_export / "encoder.json").read_text())
    torch.manual_seed(seed)
    arch = side["architecture"]
    enc = build_encoder({"name": arch["name"], **arch["params"]})
    export_encoder(enc, out, preprocessing=side["preprocessing"], data={}, training={"steps": 0})
    return out


def synthesize(shards: Path, out: Path, r: Recipe) -> Path:
    """Class-conditional DDPM trained through the pretrain engine on this label budget's train
    images only (the generator sees no label the classifier may not), then sampled by synth."""
    from medfm.models.diffusion.sampling import SamplerSettings
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run
    from medfm.synth.generate import GenerateOptions, generate

    synthetic = out / "synthetic"
    if (synthetic / "manifest.json").exists():
        return synthetic
    cfg = load_config(None, base={
        "name": "bench-ddpm", "out_dir": str(out / "ddpm"),
        "data": {"shards": str(shards), "split": "train", "class_key": "label",
                 "batch_size": 32, "num_workers": 0},
        "objectives": [{"name": "diffusion", "sample_size": [28, 28], "channels": [16, 32, 32],
                        "num_classes": 2, "attention_levels": [False, False, False],
                        "layers_per_block": 1}],
        "train": {"max_steps": r.diffusion_steps, "lr": 2e-3, "weight_decay": 0.0,
                  "warmup_steps": 20, "ema_decay": 0.99, "checkpoint_every": 10**6,
                  "log_every": 100, "plots": False, "loggers": ["csv"], "seed": r.seed},
    })  # fmt: skip
    run(cfg)
    opts = GenerateOptions(n=r.synthetic_n, sampler=SamplerSettings("ddim", r.sampler_steps))
    generate(str(out / "ddpm" / "export"), str(synthetic), opts)  # classes alternate: balanced
    return synthetic


def finetune(
    name: str,
    encoder: Path,
    shards: Path,
    mode: str,
    fraction: float,
    r: Recipe,
    work: Path,
    synthetic: Path | None = None,
) -> dict[str, Any]:
    """One cell through medfm.finetune; returns its metrics.json."""
    from medfm.finetune import load_config, run

    epochs, batch = dict(r.epochs)[fraction], dict(r.batch)[fraction]
    train = {
        "epochs": epochs,
        "lr": 1e-3,
        "weight_decay": 0.05,
        "layer_decay": 0.75,
        "warmup_epochs": 1,
        "augment_shift": 2,
        "augment_scale": 0.1,
        "seed": r.seed,
    }
    if mode == "linear_probe":
        train = {"epochs": r.probe_epochs, "lr": 1e-2, "weight_decay": 1e-4, "seed": r.seed}
        batch = 256
    elif mode == "lora":
        train |= {"lr": 3e-3}
    cfg = {
        "name": name, "out_dir": str(work / "cells" / name), "encoder": str(encoder),
        "mode": mode,
        "data": {"shards": str(shards), "batch_size": batch, "num_workers": r.workers},
        "task": {"type": "binary", "label_key": "label", "label_names": LABELS},
        "lora": {"rank": 8, "alpha": 16},
        "train": train,
        "eval": {"bootstrap": r.bootstrap, "threshold": "val_youden", "plots": False},
    }  # fmt: skip
    if synthetic is not None:
        # The bench measures what mixing does whatever the audit says; each run records it.
        cfg["data"]["synthetic"] = {
            "shards": str(synthetic),
            "ratio": r.synthetic_ratio,
            "allow_unaudited": True,
        }
    out = run(load_config(None, base=cfg))
    return json.loads((out / "metrics.json").read_text())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        label = row["method"] + (" + synthetic" if row["synthetic"] else "")
        series.setdefault(label, []).append((row["fraction"], row["auc"]))
    for label, pts in series.items():
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, "o--" if "synthetic" in label else "o-", label=label)
    for (name, (auc, _)), color in zip(PAPER.items(), ("grey", "black", "tab:brown"), strict=True):
        ax.axhline(auc, color=color, ls=":", lw=1)
        ax.text(0.0105, auc + 0.002, f"{name} (paper) {auc}", fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of train labels (PneumoniaMNIST, 4,708 = 100%)")
    ax.set_ylabel("test AUC")
    ax.set_title(
        "PneumoniaMNIST: test AUC vs label fraction (dotted: MedMNIST v2 paper)", fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one fraction, a few epochs (< 60 s)")
    ap.add_argument("--out", default="runs/bench-learning", help="where results are written")
    ap.add_argument("--work", default="runs/bench-learning/work", help="shards and runs")
    args = ap.parse_args()
    data = os.environ.get("MEDFM_SAMPLE_DATA", "")
    npz = Path(data, "pneumoniamnist", "pneumoniamnist.npz")
    if not data or not npz.is_file():
        raise SystemExit("set MEDFM_SAMPLE_DATA to the folder holding pneumoniamnist/")
    r = QUICK if args.quick else Recipe()
    out = Path(args.out)
    work = Path(args.work) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    shards = {f: write_shards(npz, work / f"shards-{f:g}", f, r.seed) for f in r.fractions}
    full_set = shards[max(r.fractions)]
    if max(r.fractions) < 1:  # quick: still pretrain on every train image
        full_set = write_shards(npz, work / "shards-1", 1.0, r.seed)
    t = time.time()
    mae = pretrain_mae(full_set, work / "mae", r)
    print(f"# MAE pretraining {time.time() - t:.0f}s", flush=True)
    rand = random_encoder(mae, work / "random-init", r.seed)
    synthetic = {}
    for f in r.synthetic_fractions:
        t = time.time()
        synthetic[f] = synthesize(shards[f], work / f"synth-{f:g}", r)
        print(f"# diffusion + sampling at {f:g}: {time.time() - t:.0f}s", flush=True)

    cells = [(f, m, mae, None) for f in r.fractions for m in ("linear_probe", "lora", "full")]
    cells += [(f, "random_init_full", rand, None) for f in r.fractions]
    cells += [(f, "full", mae, synthetic[f]) for f in r.synthetic_fractions]
    rows = []
    with (out / "learning.jsonl").open("w") as fh:
        for f, method, encoder, syn in cells:
            t = time.time()
            mode = "full" if method == "random_init_full" else method
            name = f"{method}-{f:g}" + ("-synthetic" if syn else "")
            m = finetune(name, encoder, shards[f], mode, f, r, work, syn)["metrics"]
            auc, acc = m["auroc"], m["accuracy"]
            row = {
                "bench": "learning", "method": method, "fraction": f, "synthetic": syn is not None,
                "auc": round(auc["value"], 4), "auc_ci": [round(auc["ci_low"], 4),
                                                        round(auc["ci_high"], 4)],
                "acc": round(acc["value"], 4), "acc_ci": [round(acc["ci_low"], 4),
                                                        round(acc["ci_high"], 4)],
                "wall_s": round(time.time() - t, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    plot(rows, out / "learning_auc.png")
    for name, (auc, acc) in PAPER.items():
        print(f"# paper {name}: AUC {auc} ACC {acc}")
    print(f"# total wall {time.time() - t0:.0f}s, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
