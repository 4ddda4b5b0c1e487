"""Pretraining throughput: the engine on real shards vs a plain in-memory tensor loop.

CPU (always): a ViT-Tiny MAE on PneumoniaMNIST shards with 2 loader workers. Reports the share
of step time spent waiting for data (target < 5%) and samples/s of the full pipeline (shards ->
medfm.shards loader -> Lightning engine) against a bare PyTorch loop over tensors already in
memory, same model, objective, optimizer and batch size (target: >= 0.9x).
GPU (when CUDA is present): MAE ViT-B/16 at 224^2 in bf16, samples/s and MFU from the same
FLOPs count the engine logs (target 4,000 images/s per H100).

    python bench/train.py [--quick]      # prints one JSON line per comparison
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(
    os.environ.get("MEDFM_SAMPLE_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)


def emit(case: str, **fields) -> None:
    print(json.dumps({"bench": "train", "case": case, **fields}), flush=True)


def write_shards(root: Path, n: int) -> Path:
    from medfm.shards import Sample, ShardSetWriter

    images = np.load(DATA / "pneumoniamnist" / "pneumoniamnist.npz")["train_images"][:n]
    with ShardSetWriter(str(root)) as w:
        for i, img in enumerate(images):
            w.write(Sample(key=f"pm-{i:05d}", kind="image2d", modality="DX", dataset="pmnist",
                           patient_id=f"p{i}", split="train", data=img))  # fmt: skip
    return root


def mae_tree(shards: Path, out: Path, steps: int, batch: int, model: dict) -> dict:
    return {
        "name": "bench", "out_dir": str(out),
        "data": {"shards": str(shards), "batch_size": batch, "num_workers": 2},
        "model": model,
        "objectives": [{"name": "mae", "decoder_dim": 128, "decoder_depth": 2}],
        "train": {"max_steps": steps, "lr": 1.5e-4, "warmup_steps": 5, "log_every": 10,
                  "checkpoint_every": 10**6, "plots": False, "loggers": ["csv"]},
    }  # fmt: skip


def tensor_loop(module, images: torch.Tensor, steps: int, batch: int, device) -> float:
    """Samples/s of fwd+bwd+AdamW over in-memory tensors: the floor any loader can reach."""
    module = module.to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1.5e-4)
    obj = next(iter(module.objectives.values()))
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx].to(device, non_blocking=True)
        module.ctx.seed = i
        with amp:
            loss = obj.loss({"data": x})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def cpu_case(quick: bool) -> None:
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import build, run

    torch.set_num_threads(1)  # one core trains, the other serves the 2 loader workers
    steps, batch = (30, 32) if quick else (200, 64)
    model = {"name": "vit2d", "size": "tiny", "img_size": 28, "patch_size": 4}
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "pm", 1024 if quick else 4708)
        cfg = load_config(None, base=mae_tree(shards, Path(tmp) / "run", steps, batch, model))
        module, dm = build(cfg)
        images = torch.stack([dm.contract.apply(it)["data"] for it in _first(dm, 512)])
        # The baseline runs before and after the engine and is averaged: on a shared machine
        # the load drifts, and bracketing keeps the drift out of the ratio.
        before = tensor_loop(module, images, steps // 3, batch, cpu)
        perf = run(cfg)["throughput"]
        after = tensor_loop(module, images, steps // 3, batch, cpu)
        base = (before + after) / 2
    wait = perf["data_wait_fraction"]
    emit("mae2d_vit_tiny_data_wait_2workers", value=round(wait, 4), max=0.05, unit="fraction")
    ours = perf["samples_per_s"]
    emit("mae2d_vit_tiny_engine_vs_tensor_loop", ours=round(ours, 1), baseline=round(base, 1),
         unit="samples/s", ratio=round(ours / base, 3), target=0.9)  # fmt: skip


def _first(dm, n: int) -> list[dict]:
    """Raw samples straight from the shard reader (for the in-memory baseline)."""
    from medfm.shards.dataset import ShardDataset

    ds = ShardDataset(dm.sources[0].root, shuffle=False)
    return [ds.load(i, 0) for i in range(min(n, ds.num_units()))]


def gpu_case(quick: bool) -> None:
    """MAE ViT-B/16, 224^2, bf16, in-memory batches: samples/s and MFU."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.engine import PretrainModule
    from medfm.pretrain.throughput import peak_flops

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = {"name": "vit2d", "size": "base", "img_size": 224, "patch_size": 16, "in_chans": 3}
    tree = mae_tree(Path("/nonexistent"), Path(tempfile.mkdtemp()), 1, 256, model)
    tree["objectives"] = [
        {"name": "mae", "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
    ]  # fmt: skip  (the MAE paper's decoder)
    module = PretrainModule(load_config(None, base=tree))
    if os.environ.get("MEDFM_BENCH_COMPILE", "1") == "1":
        module.encoder.compile()
    images = torch.rand(1024, 3, 224, 224, device=device)
    rate = tensor_loop(module, images, 20 if quick else 100, 256, device)
    flops = module.flops_per_sample()
    mfu = flops * rate / (peak_flops(device) or float("nan"))
    emit("mae_vit_b16_224_bf16_samples_per_s", value=round(rate, 1), min=4000.0,
         unit="samples/s", device=torch.cuda.get_device_name())  # fmt: skip
    emit("mae_vit_b16_224_bf16_mfu", value=round(mfu, 4), min=0.3, unit="fraction")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 CPU cores)")
    args = p.parse_args()
    if not (DATA / "pneumoniamnist" / "pneumoniamnist.npz").exists():
        sys.exit(f"bench/train.py: set MEDFM_SAMPLE_DATA (no PneumoniaMNIST under {DATA})")
    cpu_case(args.quick)
    if torch.cuda.is_available():
        gpu_case(args.quick)


if __name__ == "__main__":
    main()
