"""Loader benchmark: medfm.shards readers against the tools a user would otherwise pick.

Runs every contender in this one process on the same data and prints one JSON line per
comparison, last, on stdout (progress goes to stderr):

1. 3D random 96^3 patches, float32 tensors, 2 workers, from CT-sized int16 volumes made by
   resampling the real TotalSegmentator CT: ShardDataset+PatchSampler (Zarr, 64^3 zstd chunks)
   against MONAI LoadImaged+RandSpatialCropd on .nii.gz and MONAI PersistentDataset.
2. Bytes read per 3D patch (counted through a wrapping Zarr store) against the compressed bytes
   of the chunks the patch intersects.
3. 2D 256x256 decoded images, 2 workers: ShardDataset against plain WebDataset and LitData
   StreamingDataset (each written with its own writer, holding the same PNG bytes), against the
   decode limit (the same bytes decoded in a tight loop in as many processes as loader workers),
   and the time to the first batch.

3D rates include loader start-up (iterator creation to last batch, one pass). 2D rates run
from the first batch to the end of the epoch (start-up is the separate time-to-first-batch
line, and the decode limit has none either); the 2D contenders alternate for several rounds and
each reports its best round, the same rule for all, because other jobs share this machine.

Generated data is cached under --cache-dir (default /tmp/medfm-bench-loader), keyed by size, so
only the first run pays for making it. Needs MEDFM_SAMPLE_DATA (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset  # noqa: F401 - see PROCESS_IMPORTS
import torch
from PIL import Image

from medfm.shards import (
    CountingStore,
    Geometry,
    PatchSampler,
    Sample,
    ShardDataLoader,
    ShardDataset,
    ShardSet,
    ShardSetWriter,
)

# PROCESS_IMPORTS: pyarrow imports pyarrow.dataset on the first Parquet read, a once-per-process
# cost (0.2 s idle, seconds on a loaded box) that a training job pays at start-up anyway; it is
# imported above so that the time to the first batch measures the loader, not Python imports.
PATCH = 96
BATCH_3D, BATCH_2D = 1, 32
SIDE_2D = 256


def log(msg: str) -> None:
    print(f"[bench loader {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ratio_line(case: str, ours: float, baseline: float, target: float, unit="samples/s") -> dict:
    return {
        "bench": "loader",
        "case": case,
        "ours": round(ours, 2),
        "baseline": round(baseline, 2),
        "unit": unit,
        "ratio": round(ours / baseline, 2),
        "target": target,
    }


def timed_epoch(loader, limit: int | None = None) -> tuple[float, int]:
    """(samples/s, samples) from creating the iterator to the last batch: startup included."""
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["key"]) if isinstance(batch, dict) and "key" in batch else len(batch)
        if limit and n >= limit:
            break
    return n / (time.perf_counter() - t0), n


# --- 3D data ---------------------------------------------------------------------------------
def resampled_ct(sample_data: Path, size: tuple[int, int, int]) -> tuple[np.ndarray, Geometry]:
    """The real CT resampled (linear) to `size` voxels over the same field of view, int16."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(sample_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    spacing = [img.GetSpacing()[i] * img.GetSize()[i] / size[i] for i in range(3)]
    out = sitk.Resample(
        img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
        img.GetDirection(), -1024, sitk.sitkInt16,
    )  # fmt: skip
    arr = sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # to ITK (i, j, k) index order
    geometry = Geometry(tuple(spacing), out.GetOrigin(), out.GetDirection())
    return np.ascontiguousarray(arr), geometry


def prepare_3d(cache: Path, sample_data: Path, size, volumes: int) -> tuple[Path, list[Path]]:
    import nibabel

    tag = "x".join(map(str, size))
    base = cache / f"ct-{tag}-{volumes}"
    root, nii = base / "shards", [base / f"ct{i}.nii.gz" for i in range(volumes)]
    if (root / "manifest.json").exists() and all(p.exists() for p in nii):
        return root, nii
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log(f"making {volumes} CT volume(s) of {tag} int16 from the TotalSegmentator CT")
    arr, geometry = resampled_ct(sample_data, size)
    with ShardSetWriter(str(root)) as w:
        for i in range(volumes):
            vol = arr if i == 0 else np.ascontiguousarray(np.flip(arr, axis=i % 3))
            w.write(
                Sample(
                    key=f"ct{i}", kind="volume3d", modality="CT", dataset="bench",
                    patient_id=f"b{i}", split="train", data=vol, geometry=geometry,
                )
            )  # fmt: skip
            nibabel.save(nibabel.Nifti1Image(vol, geometry.affine()), nii[i])
    return root, nii


def ours_3d(root: Path, patches: int, workers: int) -> float:
    n_vol = len(ShardSet(str(root)))
    sampler = PatchSampler(
        str(root), PATCH, mode="uniform", patches_per_volume=-(-patches // n_vol)
    )
    ds = ShardDataset(str(root), patches=sampler, seed=0)
    loader = ShardDataLoader(ds, BATCH_3D, num_workers=workers)
    rate, _ = timed_epoch(loader, patches)
    return rate


def monai_transforms():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

    return Compose(
        [
            LoadImaged(keys=["image"], image_only=True),
            EnsureChannelFirstd(keys=["image"]),
            RandSpatialCropd(keys=["image"], roi_size=(PATCH,) * 3, random_size=False),
        ]
    )


def monai_loader(ds, workers: int):
    from monai.data import DataLoader

    return DataLoader(ds, batch_size=BATCH_3D, num_workers=workers, shuffle=True)


def monai_load_crop(nii: list[Path], samples: int, workers: int) -> float:
    from monai.data import Dataset

    data = [{"image": str(nii[i % len(nii)])} for i in range(samples)]
    rate, _ = timed_epoch_monai(monai_loader(Dataset(data, monai_transforms()), workers))
    return rate


def monai_persistent(nii: list[Path], samples: int, workers: int, cache: Path) -> float:
    from monai.data import PersistentDataset

    data = [{"image": str(nii[i % len(nii)])} for i in range(samples)]
    ds = PersistentDataset(data, monai_transforms(), cache_dir=cache)
    for i in range(min(len(nii), samples)):  # fill the cache first: we time the cached epochs
        ds[i]
    rate, _ = timed_epoch_monai(monai_loader(ds, workers))
    return rate


def timed_epoch_monai(loader) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        assert batch["image"].dtype == torch.float32
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0), n


def shard_index(path: Path, grid: tuple[int, ...]) -> np.ndarray:
    """(offset, nbytes) per chunk from a Zarr sharding-codec index (end of file, + crc32c)."""
    n = int(np.prod(grid))
    with open(path, "rb") as f:
        f.seek(-(16 * n + 4), os.SEEK_END)
        raw = f.read(16 * n)
    return np.frombuffer(raw, "<u8").reshape(*grid, 2)


def bytes_per_patch(root: Path, patches: int) -> float:
    """Bytes our reader fetches per patch / compressed bytes of the chunks the patch touches."""
    stores: list[CountingStore] = []

    def counting(store):
        stores.append(CountingStore(store))
        return stores[-1]

    sampler = PatchSampler(str(root), PATCH, mode="uniform", store_wrapper=counting)
    row = next(iter(ShardSet(str(root)).rows()))
    image = sampler.reader().open(row).image
    (chunk,), shard = image.chunks[:1], image.shards
    files = sorted((root / row["shard"] / "image" / "c").rglob("*"))
    assert [p for p in files if p.is_file()] == [root / row["shard"] / "image/c/0/0/0"], (
        "bench expects one shard file per volume"
    )
    index = shard_index(root / row["shard"] / "image/c/0/0/0", tuple(s // chunk for s in shard))
    rng = np.random.default_rng(0)
    read = touched = 0
    for _ in range(patches):
        stores[0].reset()
        p = sampler.patch(row, 0, rng)
        hit = [
            range(s // chunk, (s + n - 1) // chunk + 1)
            for s, n in zip(p["start"], p["size"], strict=True)
        ]
        touched += sum(int(index[i, j, k][1]) for i in hit[0] for j in hit[1] for k in hit[2])
        read += stores[0].bytes_read
    return read / touched


# --- 2D data ---------------------------------------------------------------------------------
def png_images(sample_data: Path, n: int) -> tuple[list[bytes], list[int]]:
    """n real chest X-rays (PneumoniaMNIST, cycled, every other pass mirrored) at 256x256."""
    z = np.load(sample_data / "pneumoniamnist" / "pneumoniamnist.npz")
    imgs, labels = z["train_images"], z["train_labels"][:, 0]
    out = []
    for i in range(n):
        im = Image.fromarray(imgs[i % len(imgs)]).resize((SIDE_2D, SIDE_2D), Image.BILINEAR)
        if (i // len(imgs)) % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=6)
        out.append(buf.getvalue())
    return out, [int(labels[i % len(imgs)]) for i in range(n)]


def decode_png_tensor(data: bytes) -> torch.Tensor:
    """What every contender does per sample: PNG -> float32 (1, H, W) in [0, 1]."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def litdata_item(i: int):
    return {"png": _PNGS[i], "cls": _LABELS[i]}


_PNGS: list[bytes] = []
_LABELS: list[int] = []


def prepare_2d(cache: Path, sample_data: Path, n: int) -> dict[str, Path]:
    base = cache / f"img2d-{n}"
    paths = {"ours": base / "ours", "wds": base / "wds", "litdata": base / "litdata"}
    global _PNGS, _LABELS
    if (base / "done").exists():
        blob, ends = (base / "pngs.bin").read_bytes(), np.load(base / "png_ends.npy")
        _PNGS = [blob[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]
        _LABELS = np.load(base / "labels.npy").tolist()
        return paths
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log(f"writing {n} 256x256 PNG X-rays with medfm, webdataset and litdata")
    _PNGS, _LABELS = png_images(sample_data, n)
    with ShardSetWriter(str(paths["ours"])) as w:
        for i, data in enumerate(_PNGS):
            arr = np.asarray(Image.open(io.BytesIO(data)))
            w.write(
                Sample(
                    key=f"x{i:06d}", kind="image2d", modality="CR", dataset="bench",
                    patient_id=f"p{i}", split="train", data=arr, labels={"class": _LABELS[i]},
                )
            )  # fmt: skip
    write_wds(paths["wds"], n)
    from litdata import optimize

    optimize(
        litdata_item, list(range(n)), str(paths["litdata"]), chunk_bytes="64MB",
        num_workers=1, verbose=False, mode="overwrite", start_method="fork",
    )  # fmt: skip
    (base / "pngs.bin").write_bytes(b"".join(_PNGS))
    np.save(base / "png_ends.npy", np.cumsum([len(b) for b in _PNGS]))
    np.save(base / "labels.npy", np.array(_LABELS))
    (base / "done").touch()
    return paths


def write_wds(out: Path, n: int) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    # 8 shards: WebDataset splits work by shard, so fewer shards than workers would idle one
    with wds.ShardWriter(str(out / "wds-%06d.tar"), maxcount=-(-n // 8), verbose=0) as sink:
        for i, data in enumerate(_PNGS):
            sink.write({"__key__": f"x{i:06d}", "png": data, "cls": _LABELS[i]})


def steady_rate(loader) -> float:
    """Samples/s from the first batch to the end of the epoch. Loader startup is excluded here
    (and reported as time to first batch), as it is from the tight-loop decode limit."""
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["data"])
    return n / (time.perf_counter() - t0)


def ours_2d(root: Path, workers: int) -> tuple[float, float]:
    """(samples/s over one epoch, seconds from creating dataset and loader to the first batch)."""
    t0 = time.perf_counter()
    loader = ShardDataLoader(ShardDataset(str(root), seed=0), BATCH_2D, num_workers=workers)
    it = iter(loader)
    next(it)
    ttfb = time.perf_counter() - t0
    del it
    return steady_rate(loader), ttfb


def wds_2d(root: Path, workers: int) -> float:
    import webdataset as wds

    urls = [str(p) for p in sorted(root.glob("*.tar"))]
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .map(lambda s: {"key": s["__key__"], "data": decode_png_tensor(s["png"])})
    )
    return steady_rate(torch.utils.data.DataLoader(ds, batch_size=BATCH_2D, num_workers=workers))


def litdata_2d(root: Path, workers: int) -> float:
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(
        str(root),
        shuffle=True,
        transform=lambda s: {"key": s["cls"], "data": decode_png_tensor(s["png"])},
    )
    return steady_rate(StreamingDataLoader(ds, batch_size=BATCH_2D, num_workers=workers))


def _decode_share(bounds: tuple[int, int]) -> int:
    for data in _PNGS[bounds[0] : bounds[1]]:
        decode_png_tensor(data)
    return bounds[1] - bounds[0]


def decode_limit(procs: int) -> float:
    """The same PNG bytes decoded to tensors in a tight loop, in `procs` processes (no loader)."""
    n = len(_PNGS)
    cuts = np.linspace(0, n, procs + 1).astype(int)
    ctx = mp.get_context("fork")
    with ctx.Pool(procs) as pool:
        pool.map(_decode_share, [(0, procs)] * procs)  # start the pool outside the timing
        t0 = time.perf_counter()
        done = sum(pool.map(_decode_share, list(zip(cuts[:-1], cuts[1:], strict=True))))
        return done / (time.perf_counter() - t0)


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under 60 s on 2 cores")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--part", choices=("all", "3d", "2d"), default="all")
    default_cache = os.environ.get("MEDFM_BENCH_CACHE", "/tmp/medfm-bench-loader")
    ap.add_argument("--cache-dir", default=default_cache)
    args = ap.parse_args()
    sample_data = Path(os.environ.get("MEDFM_SAMPLE_DATA", ""))
    if not (sample_data / "totalsegmentator").is_dir():
        sys.exit("bench/loader.py needs MEDFM_SAMPLE_DATA (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    cache, w = Path(args.cache_dir), args.workers
    cache.mkdir(parents=True, exist_ok=True)
    size, volumes = (512, 512, 300), (1 if args.quick else 3)
    n_ours, n_monai, n_pers = (240, 2, 4) if args.quick else (1200, 8, 16)
    n_2d, rounds = (1000, 3) if args.quick else (20000, 3)
    lines = []

    if args.part in ("all", "3d"):
        lines += bench_3d(args, cache, sample_data, size, volumes, (n_ours, n_monai, n_pers))
    if args.part in ("all", "2d"):
        lines += bench_2d(cache, sample_data, n_2d, w, rounds)
    for line in lines:
        print(json.dumps(line), flush=True)


def bench_3d(args, cache, sample_data, size, volumes, counts) -> list[dict]:
    n_ours, n_monai, n_pers = counts
    w, lines = args.workers, []
    tag = f"{'x'.join(map(str, size))}x{volumes}vol"
    root3d, nii = prepare_3d(cache, sample_data, size, volumes)
    log("3D: ours")
    ours = ours_3d(root3d, n_ours, w)
    log(f"3D: ours {ours:.1f} patches/s; MONAI LoadImaged+RandSpatialCropd")
    load = monai_load_crop(nii, n_monai, w)
    log(f"3D: MONAI load+crop {load:.2f}/s; MONAI PersistentDataset")
    pers_cache = cache / "monai-persistent"
    shutil.rmtree(pers_cache, ignore_errors=True)
    pers = monai_persistent(nii, n_pers, w, pers_cache)
    shutil.rmtree(pers_cache, ignore_errors=True)
    log(f"3D: MONAI persistent {pers:.2f}/s; bytes per patch")
    lines.append(ratio_line(f"patch3d_vs_monai_loadimage_{tag}", ours, load, 100.0))
    lines.append(ratio_line(f"patch3d_vs_monai_persistent_{tag}", ours, pers, 10.0))
    bpp = bytes_per_patch(root3d, 10 if args.quick else 50)
    lines.append(
        {"bench": "loader", "case": "patch3d_bytes_read_vs_intersecting_chunk_bytes",
         "value": round(bpp, 3), "unit": "x", "max": 1.2}
    )  # fmt: skip

    return lines


def bench_2d(cache, sample_data, n_2d, w, rounds) -> list[dict]:
    """Contenders alternate for `rounds` rounds; each reports its best round (the round least
    disturbed by other load on the machine), the same rule for all."""
    paths = prepare_2d(cache, sample_data, n_2d)
    best: dict[str, float] = {}
    for r in range(rounds):
        got = {"limit": decode_limit(w)}
        got["ours"], got["ttfb"] = ours_2d(paths["ours"], w)
        got["wds"], got["litdata"] = wds_2d(paths["wds"], w), litdata_2d(paths["litdata"], w)
        log(f"2D round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()))
        for k, v in got.items():
            best[k] = min(best.get(k, v), v) if k == "ttfb" else max(best.get(k, v), v)
    tag = f"256x256png_{n_2d}"
    return [
        ratio_line(f"image2d_vs_webdataset_{tag}", best["ours"], best["wds"], 1.0),
        ratio_line(f"image2d_vs_litdata_{tag}", best["ours"], best["litdata"], 1.0),
        ratio_line(f"image2d_vs_decode_limit_{tag}", best["ours"], best["limit"], 0.8),
        {"bench": "loader", "case": "image2d_time_to_first_batch_local",
         "value": round(best["ttfb"], 3), "unit": "s", "max": 1.0},
    ]  # fmt: skip


if __name__ == "__main__":
    main()
