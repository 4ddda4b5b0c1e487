"""Synth bench: our sampler vs a plain diffusers pipeline loop, and the audit's cost.

Cases (one JSON line each):
- sampler_vs_diffusers_ddim: samples/s of `medfm` DDIM sampling (seeded per sample) against
  diffusers' DDIMPipeline on the same UNet, batch size and step count. Target >= 1.0x.
- generate_shards_vs_diffusers_ddim: the same, but ours also writes a verified shard set.
- audit_seconds_per_1000: wall time of `audit` per 1,000 synthetic samples (PneumoniaMNIST
  reals when MEDFM_SAMPLE_DATA is set, else random images), bound "max".

Run: python bench/synth.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medfm.models.diffusion.contract import build_contract
from medfm.models.diffusion.export import export_diffusion
from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
from medfm.models.diffusion.sampling import SamplerSettings, sample
from medfm.shards import Manifest, Sample, ShardSetWriter


def emit(case: str, **fields) -> None:
    print(json.dumps({"bench": "synth", "case": case, **fields}), flush=True)


def real_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), splits) from PneumoniaMNIST, or random when absent."""
    root = os.environ.get("MEDFM_SAMPLE_DATA")
    path = Path(root or "", "pneumoniamnist", "pneumoniamnist.npz")
    if root and path.exists():
        d = np.load(path)
        train, val = d["train_images"][: n - n // 5], d["val_images"][: n // 5]
        images = np.concatenate([train, val])
    else:
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    splits = np.array(["train"] * (n - n // 5) + ["val"] * (n // 5))
    return images, splits


def write_real(root: str, images: np.ndarray, splits: np.ndarray) -> None:
    with ShardSetWriter(root) as w:
        for i, (img, split) in enumerate(zip(images, splits, strict=True)):
            w.write(
                Sample(
                    key=f"real-{i:06d}",
                    kind="image2d",
                    modality="CR",
                    dataset="bench",
                    patient_id=f"p{i}",
                    split=str(split),
                    data=img,
                )
            )


def model(tmp: str, real: str) -> tuple[DiffusionModel, str]:
    cfg = DiffusionConfig(
        sample_size=(28, 28), channels=(16, 32, 32), attention_levels=(False, False, False)
    )
    obj = DiffusionModel(cfg).eval()
    m = Manifest.open(real)
    rows = [r for r in m.rows() if r["split"] == "train"]
    contract = build_contract(real, rows, m.header, (28, 28), None)
    export_diffusion(
        obj,
        tmp,
        preprocessing=contract,
        classes=[],
        data_manifests=[{"root": real, "sha256": m.header["manifest"]["sha256"]}],
    )
    return obj, tmp


def best_rates(fns: list, n: int, repeats: int) -> list[float]:
    """Samples/s of each function, best of `repeats`, timed interleaved so that load changes on
    a shared machine hit both sides alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return [n / b for b in best]


def diffusers_loop(obj: DiffusionModel, batch: int, steps: int):
    """The plain diffusers route: DDIMPipeline on the same UNet and schedule."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=obj.unet, scheduler=DDIMScheduler.from_config(obj.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return lambda: pipe(
        batch_size=batch, num_inference_steps=steps, output_type="np", generator=gen
    )


def bench_sampler(obj: DiffusionModel, batch: int, steps: int, repeats: int) -> None:
    settings = SamplerSettings("ddim", steps)
    seeds = list(range(batch))

    def ours():
        sample(obj, seeds, settings)

    theirs = diffusers_loop(obj, batch, steps)
    ours(), theirs()  # warm-up
    a, b = best_rates([ours, theirs], batch, repeats)
    emit(
        "sampler_vs_diffusers_ddim",
        ours=round(a, 2),
        baseline=round(b, 2),
        unit="samples/s",
        ratio=round(a / b, 3),
        target=1.0,
        steps=steps,
        batch=batch,
    )


def bench_generate(obj, export: str, tmp: str, n: int, batch: int, steps: int, repeats: int) -> str:
    """Ours writes a shard set as well; the baseline only returns arrays. Best of `repeats`
    like the sampler case: a single round charged ours with one-time loading of the export."""
    from medfm.shards import verify
    from medfm.synth.generate import GenerateOptions, generate

    out = f"{tmp}/synthetic"
    opts = GenerateOptions(
        n=n, sampler=SamplerSettings("ddim", steps), batch_size=batch, overwrite=True
    )
    pipe = diffusers_loop(obj, batch, steps)

    def theirs():
        for _ in range(0, n, batch):
            pipe()

    a, b = best_rates([lambda: generate(export, out, opts), theirs], n, repeats)
    assert verify(out).ok
    emit(
        "generate_shards_vs_diffusers_ddim",
        ours=round(a, 2),
        baseline=round(b, 2),
        unit="samples/s",
        ratio=round(a / b, 3),
        target=1.0,
        steps=steps,
        batch=batch,
        n=n,
    )
    return out


def bench_audit(synthetic: str, real: str, tmp: str, n: int) -> None:
    from medfm.synth.audit import audit, load_audit_config

    cfg = load_audit_config(overrides={"msssim_pairs": 200})
    t = time.perf_counter()
    audit(synthetic, real, f"{tmp}/audit", cfg)
    per_1000 = (time.perf_counter() - t) / n * 1000
    emit(
        "audit_seconds_per_1000",
        value=round(per_1000, 2),
        unit="s/1000 samples",
        max=120.0,
        synthetic=n,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, < 60 s on 2 cores")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    args = ap.parse_args()
    # One thread by default: on a shared 2-core box, spinning OpenMP threads distort timings.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, steps, repeats = (16, 10, 2) if args.quick else (64, 50, 3)
    n_real, n_synth = (400, 64) if args.quick else (5000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        real = f"{tmp}/real"
        write_real(real, *real_images(n_real))
        obj, export = model(f"{tmp}/model", real)
        bench_sampler(obj, batch, steps, repeats)
        synthetic = bench_generate(obj, export, tmp, n_synth, batch, steps, repeats)
        bench_audit(synthetic, real, tmp, n_synth)


if __name__ == "__main__":
    main()
