"""GPU benchmark: MAE ViT-B/16 at 224² in bf16 from real shards on disk, through medfm's loader
and engine, against a plain loop over the same model and tensors already on the device.

Cases (one JSON line each on stdout, progress on stderr):
1. decode_per_core: images/s one CPU core decodes for each storage of the same 224² uint8 chest
   X-rays (PneumoniaMNIST upsampled): pre-decoded .npy arrays (what the bench's shards hold),
   lossless PNG, JPEG through PIL and through torchvision; JPEG on the GPU through nvjpeg
   (torchvision.io.decode_jpeg(device="cuda"), batched) when a GPU is present.
2. mae2d_vit_b16_224: the engine's images/s per GPU, MFU, data-wait fraction and peak memory
   (bf16-mixed, TF32, fused AdamW, loader workers on the shards), against the plain loop (the
   ceiling: no loader, no Lightning) and the DailyMAE figure (1,980 img/s per A100) as the
   published anchor. Target: >= 4,000 img/s per H100-class GPU with data wait < 5%.
3. mae3d_vit_b_96: the 3D MAE ViT-B on 96³ patches of CT-sized volumes (the real TotalSegmentator
   CT resampled), patches/s per GPU.
4. ddp_scaling: case 2 on two GPUs in one DDP job, per-GPU rate against one GPU (>= 2 GPUs).

    python bench/gpu.py               # on a GPU machine (minutes)
    python bench/gpu.py --compile     # torch.compile of the objectives (adds compile time)
    python bench/gpu.py --cpu-smoke   # every case at tiny size on CPU, "gpu": "not measured"

Needs MEDFM_SAMPLE_DATA (PneumoniaMNIST and the TotalSegmentator CT).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("MEDFM_SAMPLE_DATA", HERE.parents[1] / "shared/data"))
DAILYMAE_A100 = 1980.0  # img/s per A100, MAE ViT-B/16 224² (DailyMAE, Wu et al., 2024)
TARGET_2D, MAX_WAIT = 4000.0, 0.05
NOT_MEASURED = "not measured"


def bench_module(name: str):
    """A sibling bench script as a module (bench/ is not a package): its helpers, not copies."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def log(msg: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(case: str, gpu: str, **fields: Any) -> None:
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}
    print(json.dumps({"bench": "gpu", "case": case, "gpu": gpu, **rounded}), flush=True)


def sizes(smoke: bool) -> dict[str, Any]:
    """Full size on a GPU; tiny on CPU (same model family, objective and data path)."""
    if smoke:
        vit = {"name": "timm", "arch": "vit_base_patch16_224", "img_size": 32, "patch_size": 8,
               "embed_dim": 64, "depth": 2, "num_heads": 4, "in_chans": 1}  # fmt: skip
        vit3d = {"name": "vit3d", "size": "tiny", "img_size": [16, 16, 16],
                 "patch_size": [8, 8, 8], "embed_dim": 64, "depth": 2, "num_heads": 4}  # fmt: skip
        decoder = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}
        return {"side": 32, "images": 64, "batch": 8, "steps": 8, "workers": 1, "vit": vit,
                "decoder": decoder, "vit3d": vit3d, "volume": (48, 48, 32), "volumes": 2,
                "batch3d": 2, "decode_n": 64}  # fmt: skip
    vit = {"name": "timm", "arch": "vit_base_patch16_224", "img_size": 224, "in_chans": 1}
    vit3d = {"name": "vit3d", "size": "base", "img_size": [96, 96, 96], "patch_size": [16, 16, 16]}
    decoder = {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}  # the MAE paper's
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    return {"side": 224, "images": 4096, "batch": 256, "steps": 80, "workers": workers,
            "vit": vit, "decoder": decoder, "vit3d": vit3d, "volume": (256, 256, 192),
            "volumes": 8, "batch3d": 16, "decode_n": 1024}  # fmt: skip


# -- data ---------------------------------------------------------------------------------------


def chest_xrays(n: int, side: int) -> np.ndarray:
    """PneumoniaMNIST 28² uint8 X-rays upsampled (bicubic) to side², cycled to n images."""
    raw = np.load(DATA / "pneumoniamnist" / "pneumoniamnist.npz")["train_images"]
    return np.stack([np.asarray(Image.fromarray(raw[i % len(raw)]).resize((side, side),
                     Image.BICUBIC)) for i in range(n)])  # fmt: skip


def write_2d(root: Path, images: np.ndarray) -> Path:
    """The images as a shard set of pre-decoded uint8 arrays (the storage this bench picks)."""
    from medfm.shards import Sample, ShardSetWriter

    with ShardSetWriter(str(root), image_encoding="npy") as w:
        for i, img in enumerate(images):
            w.write(Sample(key=f"cxr-{i:05d}", kind="image2d", modality="DX", dataset="pmnist",
                           patient_id=f"p{i:05d}", split="train", data=img))  # fmt: skip
    return root


def write_3d(root: Path, size: tuple[int, int, int], volumes: int) -> Path:
    from medfm.shards import Sample, ShardSetWriter

    vol, geometry = bench_module("loader").resampled_ct(DATA, size)
    with ShardSetWriter(str(root), chunks=(64, 64, 64)) as w:
        for i in range(volumes):
            w.write(Sample(key=f"ct-{i:03d}", kind="volume3d", modality="CT", dataset="ts",
                           patient_id=f"ct{i}", split="train", data=vol,
                           geometry=geometry))  # fmt: skip
    return root


# -- decode per core ----------------------------------------------------------------------------


def per_core_rate(decode, blobs: list[bytes]) -> float:
    """Images/s of `decode` over `blobs` on one thread (best of 3 passes: a shared machine)."""
    saved, best = torch.get_num_threads(), 0.0
    torch.set_num_threads(1)
    for _ in range(3):
        t = time.perf_counter()
        for b in blobs:
            decode(b)
        best = max(best, len(blobs) / (time.perf_counter() - t))
    torch.set_num_threads(saved)
    return best


def decode_case(images: np.ndarray, gpu: str) -> None:
    import torchvision.io

    from medfm.shards.codecs import decode_npy, decode_png, encode_npy, encode_png

    jpegs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    npys, pngs = [encode_npy(i) for i in images], [encode_png(i) for i in images]
    side = images.shape[1]
    rates = {
        "npy_uint8": per_core_rate(lambda b: decode_npy(b, "bench"), npys),
        "png": per_core_rate(lambda b: decode_png(b, "bench"), pngs),
        "jpeg_pil": per_core_rate(lambda b: np.asarray(Image.open(io.BytesIO(b))), jpegs),
        "jpeg_torchvision": per_core_rate(
            lambda b: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
            jpegs,
        ),
    }
    for storage, rate in rates.items():
        emit("decode_per_core", gpu, storage=storage, side=side, unit="images/s/core",
             ours=rate, cores_for_target=TARGET_2D / rate)  # fmt: skip
    if gpu == NOT_MEASURED:
        emit("decode_nvjpeg", gpu, storage="jpeg_nvjpeg", side=side, unit="images/s",
             ours=NOT_MEASURED)  # fmt: skip
        return
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    torchvision.io.decode_jpeg(data[:8], device="cuda")  # warm-up: the nvjpeg handle
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        torchvision.io.decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    rate = 3 * len(data) / (time.perf_counter() - t)
    emit("decode_nvjpeg", gpu, storage="jpeg_nvjpeg", side=side, unit="images/s", ours=rate)


# -- training cases -----------------------------------------------------------------------------


def tree(shards: Path, out: Path, model: dict, decoder: dict, s: dict, **train: Any) -> dict:
    return {
        "name": "bench-gpu", "out_dir": str(out),
        "data": {"shards": str(shards), "batch_size": train.pop("batch", s["batch"]),
                 "num_workers": s["workers"]},
        "model": model,
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True, **decoder}],
        "train": {"max_steps": s["steps"], "blr": 1.5e-4, "warmup_steps": 5, "log_every": 10,
                  "checkpoint_every": 10**6, "plots": False, "loggers": ["csv"], **train},
    }  # fmt: skip


def engine(cfg_tree: dict) -> dict:
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    return run(load_config(None, base=cfg_tree))["throughput"]


def ceiling(cfg_tree: dict, steps: int, device: torch.device) -> float:
    """The plain loop (bench/train.py's) on the same model, over tensors already on the device."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.engine import fast_math
    from medfm.pretrain.train import build

    fast_math(device)
    module, data = build(load_config(None, base=cfg_tree))
    plain = bench_module("train")
    x = torch.stack([data.contract.apply(it)["data"] for it in plain._first(data, 512)])
    batch = cfg_tree["data"]["batch_size"]
    return plain.tensor_loop(module, x.to(device), steps, batch, device)


def perf_fields(perf: dict, world: int) -> dict[str, Any]:
    return {
        "ours": perf["samples_per_s"] / world,
        "mfu": perf.get("mfu", NOT_MEASURED),
        "data_wait_fraction": perf["data_wait_fraction"],
        "peak_memory_gib": perf["peak_memory_gib"],
    }


def mae2d_case(tmp: Path, shards: Path, s: dict, gpu: str, compile_: bool) -> float:
    device = torch.device("cpu" if gpu == NOT_MEASURED else "cuda")
    accel = {"accelerator": device.type, "devices": 1, "compile": compile_}
    cfg = tree(shards, tmp / "run2d", s["vit"], s["decoder"], s, **accel)
    log("mae2d: the engine on the shards")
    perf = engine(cfg)
    log("mae2d: the plain loop on the same model and tensors")
    top = ceiling(cfg, max(4, s["steps"] // 4), device)
    fields = perf_fields(perf, 1)
    emit("mae2d_vit_b16_224", gpu, unit="images/s/gpu", **fields, ceiling=top,
         ratio=fields["ours"] / top, anchor_dailymae_a100=DAILYMAE_A100, target=TARGET_2D,
         max_data_wait=MAX_WAIT, side=s["side"], batch=s["batch"], compile=compile_,
         precision="bf16-mixed" if device.type == "cuda" else "32-true")  # fmt: skip
    return fields["ours"]


def mae3d_case(tmp: Path, s: dict, gpu: str) -> None:
    device = "cpu" if gpu == NOT_MEASURED else "cuda"
    log("mae3d: CT-sized volumes from the real CT")
    shards = write_3d(tmp / "ct", s["volume"], s["volumes"])
    cfg = tree(shards, tmp / "run3d", s["vit3d"], s["decoder"], s, batch=s["batch3d"],
               accelerator=device, devices=1)  # fmt: skip
    cfg["data"]["patches_per_volume"] = 8
    perf = engine(cfg)
    emit("mae3d_vit_b_96", gpu, unit="patches/s/gpu", **perf_fields(perf, 1),
         patch=s["vit3d"]["img_size"])  # fmt: skip


def ddp_case(tmp: Path, shards: Path, s: dict, gpu: str, single: float | None) -> None:
    if gpu == NOT_MEASURED or torch.cuda.device_count() < 2 or single is None:
        emit("ddp_scaling", gpu, unit="efficiency", ours=NOT_MEASURED,
             reason="needs 2 GPUs", devices=torch.cuda.device_count())  # fmt: skip
        return
    cfg = tree(shards, tmp / "run_ddp", s["vit"], s["decoder"], s, accelerator="cuda",
               devices=2, strategy="ddp")  # fmt: skip
    perf = engine(cfg)
    per_gpu = perf["samples_per_s"] / 2
    emit("ddp_scaling", gpu, unit="efficiency", ours=per_gpu / single, per_gpu=per_gpu,
         single=single, devices=2)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every case, tiny, on CPU (< 60 s)")
    p.add_argument("--compile", action="store_true", help="train.compile for the 2D engine")
    p.add_argument("--only", nargs="*", default=None, help="cases: decode mae2d mae3d ddp")
    args = p.parse_args()
    if not (DATA / "pneumoniamnist" / "pneumoniamnist.npz").exists():
        sys.exit(f"bench/gpu.py: set MEDFM_SAMPLE_DATA (no PneumoniaMNIST under {DATA})")
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        log("no CUDA device: running the CPU smoke sizes")
    gpu = NOT_MEASURED if smoke else torch.cuda.get_device_name()
    s = sizes(smoke)
    only = set(args.only or ("decode", "mae2d", "mae3d", "ddp"))
    with tempfile.TemporaryDirectory(prefix="medfm-bench-gpu-") as d:
        tmp = Path(d)
        images = chest_xrays(max(s["images"], s["decode_n"]), s["side"])
        if "decode" in only:
            decode_case(images[: s["decode_n"]], gpu)
        single = None
        if only & {"mae2d", "ddp"}:
            log(f"writing {s['images']} {s['side']}² uint8 images as shards")
            shards = write_2d(tmp / "cxr", images[: s["images"]])
            if "mae2d" in only:
                single = mae2d_case(tmp, shards, s, gpu, args.compile)
            if "ddp" in only:
                ddp_case(tmp, shards, s, gpu, single)
        if "mae3d" in only:
            mae3d_case(tmp, s, gpu)


if __name__ == "__main__":
    main()
