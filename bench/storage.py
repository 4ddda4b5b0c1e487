"""Object-store benchmark: medfm's readers on S3 against the same shard set on local disk.

One run starts moto's standalone S3 server (`moto_server`, from `moto[server]` in the dev
extra) as a separate process on a free loopback port, uploads a shard set written on local disk
to it object by object (the same bytes), and reads both copies in this process, alternating, with
the same readers and settings. It prints one JSON line per comparison, last, on stdout (progress
goes to stderr):

1. 3D random 96^3 patches, float32 tensors, from CT-sized int16 volumes (the real
   TotalSegmentator CT resampled, as bench/loader.py makes them; 64^3 zstd chunks):
   ShardDataset+PatchSampler from s3:// against the same from disk, patches/s.
2. 2D 256x256 PNG chest X-rays decoded to tensors: ShardDataset from s3:// against disk,
   samples/s from the first sample to the end of the epoch.
3. Bytes fetched from S3 per 3D patch against the compressed bytes of the Zarr chunks the patch
   intersects (from the shard index): counted at the s3fs layer, on every call that returns
   object bytes (`_cat_file`, which zarr's ranged reads use; `S3File._fetch_range`, what file
   objects read with their read-ahead; `_get_file`), after one patch per volume has opened it
   (metadata and the shard's chunk index are read once per volume, and reported apart).
4. Bytes fetched from S3 per shuffled 2D epoch (those of case 2) against the bytes of the tar
   shards (each sample is read once an epoch: 1.0 is the floor), counted the same way.

Rates are the best of --rounds alternating rounds, the same rule for both sides, because other
jobs share the machine. Loader workers default to 0 (the server competes for the same cores).
The local sets are cached under --cache-dir (default /tmp/medfm-bench-storage), keyed by size.
Needs MEDFM_SAMPLE_DATA (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loader import PATCH, png_images, resampled_ct, shard_index  # noqa: E402
from s3_helpers import S3Reads  # noqa: E402 - the s3fs-layer byte counter the tests use

from medfm.io import put_tree  # noqa: E402
from medfm.shards import (  # noqa: E402
    PatchSampler,
    Sample,
    ShardDataLoader,
    ShardDataset,
    ShardSet,
    ShardSetWriter,
)

BUCKET = "medfm-bench"


def log(msg: str) -> None:
    print(f"[bench storage {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ratio_line(case: str, ours: float, baseline: float, unit: str) -> dict:
    return {"bench": "storage", "case": case, "ours": round(ours, 2),
            "baseline": round(baseline, 2), "unit": unit,
            "ratio": round(ours / baseline, 3)}  # fmt: skip


# --- the S3 server ---------------------------------------------------------------------------
@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process (not threads of this one, which would share the
    reader's interpreter); this process's environment points botocore at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"s3://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- data ------------------------------------------------------------------------------------
def prepare_3d(cache: Path, sample_data: Path, size, volumes: int) -> Path:
    root = cache / f"ct-{'x'.join(map(str, size))}-{volumes}"
    if (root / "manifest.json").exists():
        return root
    log(f"making {volumes} CT volume(s) of {size} int16 from the TotalSegmentator CT")
    arr, geometry = resampled_ct(sample_data, size)
    with ShardSetWriter(str(root)) as w:
        for i in range(volumes):
            vol = arr if i == 0 else np.ascontiguousarray(np.flip(arr, axis=i % 3))
            w.write(Sample(key=f"ct{i}", kind="volume3d", modality="CT", dataset="bench",
                           patient_id=f"b{i}", split="train", data=vol,
                           geometry=geometry))  # fmt: skip
    return root


def prepare_2d(cache: Path, sample_data: Path, n: int) -> Path:
    import io

    from PIL import Image

    root = cache / f"img2d-{n}"
    if (root / "manifest.json").exists():
        return root
    log(f"writing {n} 256x256 PNG X-rays")
    pngs, labels = png_images(sample_data, n)
    with ShardSetWriter(str(root)) as w:
        for i, (data, y) in enumerate(zip(pngs, labels, strict=True)):
            w.write(Sample(key=f"x{i:06d}", kind="image2d", modality="CR", dataset="bench",
                           patient_id=f"p{i}", split="train",
                           data=np.asarray(Image.open(io.BytesIO(data))),
                           labels={"class": y}))  # fmt: skip
    return root


# --- readers ---------------------------------------------------------------------------------
def patches_per_s(root: str, patches: int, workers: int) -> float:
    """Patches/s from creating the iterator to the last patch (volume opening included)."""
    n_vol = len(ShardSet(root))
    sampler = PatchSampler(root, PATCH, mode="uniform", patches_per_volume=-(-patches // n_vol))
    loader = ShardDataLoader(ShardDataset(root, patches=sampler, seed=0), 1, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["key"])
    return n / (time.perf_counter() - t0)


def samples_per_s(root: str, workers: int) -> float:
    """Samples/s from the first batch to the end of the epoch (start-up excluded)."""
    loader = ShardDataLoader(ShardDataset(root, seed=0), 32, num_workers=workers)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["data"])
    return n / (time.perf_counter() - t0)


def touched_bytes(row: dict, index: np.ndarray, chunk: int, p: dict) -> int:
    """Stored (compressed) bytes of the chunks a patch intersects, from the shard index."""
    hit = [range(s // chunk, (s + n - 1) // chunk + 1)
           for s, n in zip(p["start"], p["size"], strict=True)]  # fmt: skip
    return sum(int(index[i, j, k][1]) for i in hit[0] for j in hit[1] for k in hit[2])


def bytes_per_patch(url: str, local: Path, patches: int) -> tuple[float, float, float]:
    """(bytes fetched / intersecting chunk bytes, calls per patch, opening bytes per volume)
    over `patches` uniform patches per volume, each volume opened by one patch first."""
    sampler = PatchSampler(url, PATCH, mode="uniform")
    reads, rng = S3Reads(), np.random.default_rng(0)
    fetched = touched = calls = opening = 0
    rows = list(ShardSet(str(local)).rows())
    with reads.counting():
        for row in rows:
            image = PatchSampler(str(local), PATCH).reader().open(row).image
            chunk, grid = image.chunks[0], tuple(s // image.chunks[0] for s in image.shards)
            index = shard_index(local / row["shard"] / "image/c/0/0/0", grid)
            before = reads.bytes
            first = sampler.patch(row, 0, rng)  # opens the group: metadata, the chunk index
            opening += reads.bytes - before - touched_bytes(row, index, chunk, first)
            for _ in range(patches):
                b, c = reads.bytes, reads.calls
                p = sampler.patch(row, 0, rng)
                fetched += reads.bytes - b
                calls += reads.calls - c
                touched += touched_bytes(row, index, chunk, p)
    n = patches * len(rows)
    return fetched / touched, calls / n, opening / len(rows)


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under 60 s on 2 cores")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=0, help="default: 1 (--quick) or 3")
    default_cache = os.environ.get("MEDFM_BENCH_CACHE", "/tmp/medfm-bench-storage")
    ap.add_argument("--cache-dir", default=default_cache)
    args = ap.parse_args()
    sample_data = Path(os.environ.get("MEDFM_SAMPLE_DATA", ""))
    if not (sample_data / "totalsegmentator").is_dir():
        sys.exit("bench/storage.py needs MEDFM_SAMPLE_DATA (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    size, volumes = ((256, 256, 160), 1) if args.quick else ((512, 512, 300), 2)
    n_patches, n_counted, n_2d = (12, 6, 384) if args.quick else (200, 50, 4096)
    rounds = args.rounds or (1 if args.quick else 3)
    local3d, local2d = (
        prepare_3d(cache, sample_data, size, volumes),
        prepare_2d(cache, sample_data, n_2d),
    )
    with moto_server() as bucket:
        s3d, s2d = f"{bucket}/ct", f"{bucket}/img2d"
        t0 = time.perf_counter()
        for local, url in ((local3d, s3d), (local2d, s2d)):
            put_tree(local, url, last=("manifest.parquet", "manifest.json"))
        log(f"uploaded both sets in {time.perf_counter() - t0:.1f} s; {rounds} rounds")
        best: dict[str, float] = {}
        reads_2d = S3Reads()  # the bytes of the 2D epochs from S3 (a wrapper: no cost to time)
        for r in range(rounds):
            got = {
                "3d_s3": patches_per_s(s3d, n_patches, args.workers),
                "3d_local": patches_per_s(str(local3d), n_patches, args.workers),
            }
            with reads_2d.counting():
                got["2d_s3"] = samples_per_s(s2d, args.workers)
            got["2d_local"] = samples_per_s(str(local2d), args.workers)
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
            best = {k: max(best.get(k, 0.0), v) for k, v in got.items()}
        ratio, calls, opening = bytes_per_patch(s3d, local3d, n_counted)
    tag = f"{'x'.join(map(str, size))}x{volumes}vol"
    tar_bytes = sum(p.stat().st_size for p in (local2d / "tars").glob("*.tar"))
    lines = [
        ratio_line(f"patch3d_s3_vs_local_{tag}", best["3d_s3"], best["3d_local"], "patches/s"),
        ratio_line(
            f"image2d_s3_vs_local_256x256png_{n_2d}", best["2d_s3"], best["2d_local"], "samples/s"
        ),
        {
            "bench": "storage",
            "case": "bytes_per_patch_vs_chunks",
            "value": round(ratio, 3),
            "unit": "x",
            "max": 1.2,
            "requests_per_patch": round(calls, 1),
            "open_bytes_per_volume": int(opening),
        },
        {
            "bench": "storage",
            "case": "image2d_bytes_read_vs_tar_bytes_per_epoch",
            "value": round(reads_2d.bytes / (tar_bytes * rounds), 3),
            "unit": "x",
            "requests_per_epoch": round(reads_2d.calls / rounds, 1),
        },
    ]
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
