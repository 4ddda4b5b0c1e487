"""Learning-quality benchmark: PneumoniaMNIST against the MedMNIST v2 paper, over 3 seeds.

    MEDFM_SAMPLE_DATA=/work/shared/data python bench/learning.py [--quick] [--out DIR]

What it does per seed, every step through the medfm stage APIs (a seed changes the label
subsets drawn, pretraining, the generators and fine-tuning):

1. Writes the official split (train 4,708 / val 524 / test 624) as medfm shard sets, one per
   label fraction. The 1% and 10% train subsets are stratified draws by the seed, nested
   (1% is inside 10%), so the fractions differ only in how many labels there are.
2. Pretrains a small ViT with MAE on the train images, labels unused (medfm.pretrain).
3. Trains a class-conditional diffusion model per small label budget on *that budget's* labeled
   images only (the generator never sees a label the classifier may not), and samples
   synthetic shard sets from it (medfm.synth).
4. Fine-tunes (medfm.finetune): linear probe, LoRA and full FT of the MAE encoder, full FT of the
   same architecture from random init, and full FT with synthetic data used three ways:
   (a) `mix`: synthetic images mixed into each epoch at a ratio;
   (b) `pretrain`: supervised training on synthetic images only, then full FT of that encoder on
       the real labels (the RoentGen-v2 protocol);
   (c) `balance`: synthetic images of the minority class only, at the ratio that balances the
       classes of each epoch.
   Best epoch and decision threshold come from val; test is scored once per cell.

Writes one JSON line per seed and cell (`learning.jsonl`), one per cell over the seeds with the
paired differences (`learning_summary.jsonl`, statistics in bench/learning_stats.py), the
targets as bench JSON lines, and `learning_auc.png` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Recipe:
    """Everything tunable in one place (tuned on val only, see docs/results.md)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("linear_probe", "lora", "full")  # of the MAE encoder
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    synthetic_fractions: tuple[float, ...] = (0.01, 0.1)  # protocols (a) mix and (b) pretrain
    balance_fractions: tuple[float, ...] = (0.01,)  # protocol (c)
    # A small ViT: patch 4 on 28x28 gives 49 tokens, dim 64 x 4 blocks is what 2 CPU cores
    # can fine-tune ~20 times per seed in the time budget.
    encoder: tuple[tuple[str, Any], ...] = (
        ("embed_dim", 64), ("depth", 4), ("num_heads", 4), ("patch_size", 4),
    )  # fmt: skip
    mae_steps: int = 1200  # x 128 = 33 epochs of the 4,708 train images
    mae_batch: int = 128
    diffusion_steps: int = 400
    synthetic_n: int = 256  # (a) pool; each epoch draws `synthetic_ratio` of its samples from it
    synthetic_ratio: float = 0.5
    pretrain_synthetic_n: int = 1024  # (b) labeled synthetic images trained on first
    pretrain_synthetic_epochs: int = 5
    pretrain_synthetic_batch: int = 64
    sampler_steps: int = 20
    # Per label fraction: epochs and batch size. Val is scored every epoch (that is how the
    # best epoch is chosen), so small fractions get small batches rather than many epochs.
    epochs: tuple[tuple[float, int], ...] = ((0.01, 25), (0.1, 15), (1.0, 8))
    batch: tuple[tuple[float, int], ...] = ((0.01, 8), (0.1, 16), (1.0, 64))
    probe_epochs: int = 100
    bootstrap: int = 1000
    workers: int = 1  # one loader process decodes while the main one computes
    seed: int = 0  # the current seed (set per seed from `seeds`)


QUICK = Recipe(
    seeds=(0, 1), methods=("linear_probe", "full"), fractions=(0.1,), synthetic_fractions=(0.1,),
    balance_fractions=(0.1,),
    mae_steps=10, diffusion_steps=5, synthetic_n=16, pretrain_synthetic_n=32,
    pretrain_synthetic_epochs=1, sampler_steps=4, epochs=((0.1, 1),), probe_epochs=5,
    bootstrap=100, workers=0,
)  # fmt: skip
MINORITY = 0  # "normal": 1,341 of the 4,708 train images


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


def train_generator(shards: Path, out: Path, r: Recipe) -> Path:
    """Class-conditional DDPM trained through the pretrain engine on this label budget's train
    images only (the generator sees no label the classifier may not); returns its export."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    export = out / "ddpm" / "export"
    if export.is_dir() and any(export.glob("*.safetensors")):
        return export
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
    return export


def sample(generator: Path, out: Path, n: int, r: Recipe, classes: list[int] | None = None) -> Path:
    """`n` images from the generator through the synth stage (classes alternate unless given)."""
    from medfm.models.diffusion.sampling import SamplerSettings
    from medfm.synth.generate import GenerateOptions, generate

    if not (out / "manifest.json").exists():
        sampler = SamplerSettings("ddim", r.sampler_steps)
        opts = GenerateOptions(n=n, sampler=sampler, classes=classes or [], seed=1000 * r.seed)
        generate(str(generator), str(out), opts)
    return out


def synthetic_then_real_set(synthetic: Path, real: Path, out: Path) -> Path:
    """Protocol (b)'s first stage: train = the synthetic images, still flagged synthetic; val and
    test = the real ones, so that its best epoch is chosen on real val as every cell's is."""
    from medfm.shards import ShardSet, ShardSetWriter

    if (out / "manifest.json").exists():
        return out
    with ShardSetWriter(str(out)) as w:
        syn = ShardSet(str(synthetic))
        for row in syn.rows():
            w.write(syn.read_sample(row))
        ref = ShardSet(str(real))
        for row in ref.rows():
            if row["split"] != "train":
                w.write(ref.read_sample(row))
        w.close()
    return out


def encoder_of_run(run_dir: Path, like: Path, out: Path) -> Path:
    """The encoder a full fine-tune trained, exported with `like`'s architecture and
    preprocessing contract, so the next fine-tune starts from it."""
    from safetensors.torch import load_file

    from medfm.models import build_encoder
    from medfm.models.export import export_encoder

    side = json.loads((like / "encoder.json").read_text())
    arch = side["architecture"]
    enc = build_encoder({"name": arch["name"], **arch["params"]})
    enc.load_state_dict(load_file(str(run_dir / "checkpoint" / "encoder.safetensors")))
    training = {"steps": "supervised on synthetic images", "run": run_dir.name}
    export_encoder(enc, out, preprocessing=side["preprocessing"], data={}, training=training)
    return out


@dataclass
class Cell:
    """One fine-tuning cell: what is trained from what, on which labels, with which synthetic
    protocol (None, "mix", "pretrain", "balance")."""

    method: str
    fraction: float
    encoder: Path
    shards: Path
    protocol: str | None = None
    synthetic: Path | None = None
    ratio: float = 0.0

    @property
    def name(self) -> str:
        return cell_name(self.method, self.fraction, self.protocol)


def cell_name(method: str, fraction: float, protocol: str | None = None) -> str:
    return f"{method}-{fraction:g}" + (f"-{protocol}" if protocol else "")


def finetune(
    name: str,
    encoder: Path,
    shards: Path,
    mode: str,
    fraction: float,
    r: Recipe,
    work: Path,
    synthetic: tuple[Path, float] | None = None,
    epochs: int | None = None,
    batch: int | None = None,
) -> Path:
    """One fine-tune through medfm.finetune; returns its run folder."""
    from medfm.finetune import load_config, run

    epochs, batch = epochs or dict(r.epochs)[fraction], batch or dict(r.batch)[fraction]
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
    # The bench measures what synthetic data does whatever its audit says; each run records it.
    cfg = {
        "name": name, "out_dir": str(work / "cells" / name), "encoder": str(encoder),
        "mode": mode,
        "data": {"shards": str(shards), "batch_size": batch, "num_workers": r.workers,
                 "allow_unaudited": True},
        "task": {"type": "binary", "label_key": "label", "label_names": LABELS},
        "lora": {"rank": 8, "alpha": 16},
        "train": train,
        "eval": {"bootstrap": r.bootstrap, "threshold": "val_youden", "plots": False},
    }  # fmt: skip
    if synthetic is not None:
        path, ratio = synthetic
        cfg["data"]["synthetic"] = {"shards": str(path), "ratio": ratio, "allow_unaudited": True}
    return Path(run(load_config(None, base=cfg)))


def balancing_ratio(shards: Path) -> float:
    """The synthetic share that, all of it minority class, evens the classes of an epoch:
    minority + s = majority with s = ratio * (real + s)."""
    from medfm.shards import Manifest

    counts = [0, 0]
    for row in Manifest.open(str(shards)).rows():
        if row["split"] == "train":
            counts[json.loads(row["labels"])["label"]] += 1
    assert counts[MINORITY] < counts[1 - MINORITY], counts
    return (counts[1 - MINORITY] - counts[MINORITY]) / (2 * counts[1 - MINORITY])


def seed_cells(npz: Path, work: Path, shared: Path, r: Recipe) -> list[Cell]:
    """Shard sets, MAE, random init and generators of one seed; returns its cells."""
    shards = {
        f: write_shards(npz, (shared if f == 1 else work) / f"shards-{f:g}", f, r.seed)
        for f in r.fractions
    }
    full_set = shards.get(1.0) or write_shards(npz, shared / "shards-1", 1.0, r.seed)
    t = time.time()
    mae = pretrain_mae(full_set, work / "mae", r)
    print(f"# seed {r.seed}: MAE pretraining {time.time() - t:.0f}s", flush=True)
    rand = random_encoder(mae, work / "random-init", r.seed)
    cells = [Cell(m, f, mae, shards[f]) for f in r.fractions for m in r.methods]
    cells += [Cell("random_init_full", f, rand, shards[f]) for f in r.fractions]
    for f in sorted(set(r.synthetic_fractions) | set(r.balance_fractions)):
        t, out = time.time(), work / f"synth-{f:g}"
        generator = train_generator(shards[f], out, r)
        if f in r.synthetic_fractions:
            mix = sample(generator, out / "synthetic", r.synthetic_n, r)
            cells.append(Cell("full", f, mae, shards[f], "mix", mix, r.synthetic_ratio))
            pre = sample(generator, out / "synthetic-pretrain", r.pretrain_synthetic_n, r)
            pre_set = synthetic_then_real_set(pre, shards[f], out / "synthetic-then-real")
            cells.append(Cell("full", f, mae, shards[f], "pretrain", pre_set))
        if f in r.balance_fractions:
            minority = sample(generator, out / "synthetic-minority", r.synthetic_n, r, [MINORITY])
            ratio = balancing_ratio(shards[f])
            cells.append(Cell("full", f, mae, shards[f], "balance", minority, ratio))
        print(f"# seed {r.seed}: diffusion + sampling at {f:g}: {time.time() - t:.0f}s", flush=True)
    return cells


def run_cell(cell: Cell, r: Recipe, work: Path) -> dict[str, Any]:
    """Fine-tunes one cell (protocol (b): twice) unless a finished run is in the work folder;
    returns its JSON line."""
    done = work / "cells" / cell.name / "bench_row.json"
    if done.exists():
        return json.loads(done.read_text())
    t = time.time()
    mode = "full" if cell.method == "random_init_full" else cell.method
    encoder, synthetic = cell.encoder, None
    if cell.protocol == "pretrain":  # supervised on synthetic first, then the real labels
        first = finetune(f"{cell.name}-stage1", cell.encoder, cell.synthetic, "full",
                         cell.fraction, r, work, epochs=r.pretrain_synthetic_epochs,
                         batch=r.pretrain_synthetic_batch)  # fmt: skip
        encoder = encoder_of_run(first, cell.encoder, work / f"{cell.name}-encoder")
    elif cell.protocol in ("mix", "balance"):
        synthetic = (cell.synthetic, cell.ratio)
    run_dir = finetune(cell.name, encoder, cell.shards, mode, cell.fraction, r, work, synthetic)
    m = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    auc, acc = m["auroc"], m["accuracy"]
    row = {
        "bench": "learning", "seed": r.seed, "method": cell.method, "fraction": cell.fraction,
        "synthetic": cell.protocol, "auc": round(auc["value"], 4),
        "auc_ci": [round(auc["ci_low"], 4), round(auc["ci_high"], 4)],
        "acc": round(acc["value"], 4),
        "acc_ci": [round(acc["ci_low"], 4), round(acc["ci_high"], 4)],
        "wall_s": round(time.time() - t, 1), "run": str(run_dir),
    }  # fmt: skip
    done.write_text(json.dumps(row))
    return row


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in summary:
        label = row["method"] + (f" + synthetic {row['synthetic']}" if row["synthetic"] else "")
        series.setdefault(label, []).append((row["fraction"], row["auc_mean"], row["auc_sd"]))
    for i, (label, pts) in enumerate(series.items()):
        xs, ys, sd = zip(*sorted(pts), strict=True)
        xs = [x * (1 + 0.03 * (i - len(series) / 2)) for x in xs]  # side by side, not on top
        ax.errorbar(xs, ys, yerr=sd, fmt="o--" if "synthetic" in label else "o-", capsize=3,
                    label=label, ms=4)  # fmt: skip
    for (name, (auc, _)), color in zip(PAPER.items(), ("grey", "black", "tab:brown"), strict=True):
        ax.axhline(auc, color=color, ls=":", lw=1)
        ax.text(0.0105, auc + 0.002, f"{name} (paper) {auc}", fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of train labels (PneumoniaMNIST, 4,708 = 100%)")
    ax.set_ylabel("test AUC, mean ± sd over seeds")
    ax.set_title(
        "PneumoniaMNIST: test AUC vs label fraction (dotted: MedMNIST v2 paper)", fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(rows: list[dict[str, Any]], npz: Path) -> list[dict[str, Any]]:
    """One line per cell over the seeds: mean ± sd, and paired AUC differences against random
    init (and, for a synthetic protocol, against the same fine-tune without it)."""
    from learning_stats import Cells, Resamples, spread, test_scores

    labels = np.load(npz)["test_labels"].reshape(-1).astype(int)
    seeds = sorted({row["seed"] for row in rows})
    cells = Cells(labels, Resamples.draw(len(labels), len(seeds)))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda x: x["seed"]):
        key = (row["method"], row["fraction"], row["synthetic"])
        auc = cells.add(cell_name(*key), test_scores(Path(row["run"])))
        # The saved outputs are in test-split order: their AUC is the stage's own figure.
        assert abs(auc - row["auc"]) < 1e-3, (row, auc)
        groups.setdefault(key, []).append(row)
    summary = []
    for (method, fraction, protocol), group in groups.items():
        auc_mean, auc_sd = spread([g["auc"] for g in group])
        acc_mean, acc_sd = spread([g["acc"] for g in group])
        line = {
            "bench": "learning", "summary": True, "method": method, "fraction": fraction,
            "synthetic": protocol, "seeds": len(group), "auc_mean": auc_mean, "auc_sd": auc_sd,
            "acc_mean": acc_mean, "acc_sd": acc_sd,
        }  # fmt: skip
        name = cell_name(method, fraction, protocol)
        if method != "random_init_full":
            line["vs_random_init"] = cells.paired(name, cell_name("random_init_full", fraction))
        if protocol:
            line["vs_no_synthetic"] = cells.paired(name, cell_name(method, fraction))
        summary.append(line)
    return summary


def targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets as bench lines (a mean over seeds against its bound)."""
    by = {(s["method"], s["fraction"], s["synthetic"]): s for s in summary}
    out = []

    def bound(case: str, value: float | None, **limit: float) -> None:
        if value is not None:
            out.append({"bench": "learning", "case": case, "value": value, **limit})

    full1 = by.get(("full", 1.0, None))
    bound("full_100pct_auc", full1 and full1["auc_mean"], min=0.96)
    bound("full_100pct_acc", full1 and full1["acc_mean"], min=0.88)
    best10 = max((s["auc_mean"] for k, s in by.items() if k[1] == 0.1 and k[0] != "random_init_full"
                  and not k[2]), default=None)  # fmt: skip
    bound("best_pretrained_10pct_auc", best10, min=0.95)
    for f in (0.01, 0.1):
        if ("full", f, None) in by:
            ci = by[("full", f, None)]["vs_random_init"]["ci"]
            bound(f"full_minus_random_init_{f:g}_ci_low", ci[0], min=0.0)
    syn = [s for k, s in by.items() if k[1] == 0.01 and k[2]]
    if syn:
        best = max(syn, key=lambda s: s["vs_no_synthetic"]["diff"])
        gain = best["vs_no_synthetic"]
        bound(f"synthetic_{best['synthetic']}_gain_1pct_auc", gain["diff"], min=0.02)
        bound(f"synthetic_{best['synthetic']}_gain_1pct_ci_low", gain["ci"][0], min=0.0)
    return out


def run_seed(npz: Path, work: Path, r: Recipe) -> list[dict[str, Any]]:
    """Every cell of one seed; its rows also go to work/seed-N/rows.jsonl."""
    seed_work, rows, t0 = work / f"seed-{r.seed}", [], time.time()
    for cell in seed_cells(npz, seed_work, work, r):
        rows.append(run_cell(cell, r, seed_work))
        print(json.dumps(public(rows[-1])), flush=True)
    (seed_work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"# seed {r.seed} done in {time.time() - t0:.0f}s", flush=True)
    return rows


def public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "run"}  # the run folder is a local path


def run_seeds(args: argparse.Namespace, npz: Path, work: Path, base: Recipe) -> list[dict]:
    """Seeds in `--jobs` processes at once (each computes on one thread: on 2 cores, 3 seeds
    side by side take about half the time of one after another), in seed order."""
    write_shards(npz, work / "shards-1", 1.0, base.seed)  # shared by every seed: before they start
    if args.jobs <= 1 or len(base.seeds) == 1:
        return [row for seed in base.seeds for row in run_seed(npz, work, replace(base, seed=seed))]
    pending = list(base.seeds)
    while pending:
        group, pending = pending[: args.jobs], pending[args.jobs :]
        argv = [sys.executable, __file__, "--out", args.out, "--work", args.work]
        argv += ["--quick"] if args.quick else []
        procs = [subprocess.Popen([*argv, "--seed", str(seed)]) for seed in group]
        failed = [seed for seed, proc in zip(group, procs, strict=True) if proc.wait() != 0]
        if failed:
            raise SystemExit(f"seeds {failed} failed (see their output above); rerun to resume")
    return [
        json.loads(line)
        for seed in base.seeds
        for line in (work / f"seed-{seed}" / "rows.jsonl").read_text().splitlines()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two seeds, one fraction (< 60 s)")
    ap.add_argument("--out", default="runs/bench-learning", help="where results are written")
    ap.add_argument("--work", default="runs/bench-learning/work", help="shards and runs")
    ap.add_argument("--jobs", type=int, default=3, help="seeds run at once, one process each")
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # one seed only (a --jobs child)
    args = ap.parse_args()
    data = os.environ.get("MEDFM_SAMPLE_DATA", "")
    npz = Path(data, "pneumoniamnist", "pneumoniamnist.npz")
    if not data or not npz.is_file():
        raise SystemExit("set MEDFM_SAMPLE_DATA to the folder holding pneumoniamnist/")
    base = QUICK if args.quick else Recipe()
    out = Path(args.out)
    work = Path(args.work) / ("quick" if args.quick else "full")
    if args.seed is not None:
        run_seed(npz, work, replace(base, seed=args.seed))
        return
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = run_seeds(args, npz, work, base)
    (out / "learning.jsonl").write_text("".join(json.dumps(public(r)) + "\n" for r in rows))
    summary = summarize(rows, npz)
    with (out / "learning_summary.jsonl").open("w") as fh:
        for line in summary + targets(summary):
            print(json.dumps(line), flush=True)
            fh.write(json.dumps(line) + "\n")
    plot(summary, out / "learning_auc.png")
    for name, (auc, acc) in PAPER.items():
        print(f"# paper {name}: AUC {auc} ACC {acc}")
    print(f"# total wall {time.time() - t0:.0f}s, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
