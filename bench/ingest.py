"""Ingest benchmarks: our Ray ingest against what a user would otherwise write, same data, one run.

    python bench/ingest.py [--quick] [--case NAME ...] [--list]

Prints one JSON line per comparison (see docs/ingest.md). Cases are registered functions:
`@bench_case("name")` taking a `BenchContext` and returning a list of result dicts; the signal
and EHR cases register the same way. Data: the TotalSegmentator CT in MEDFM_SAMPLE_DATA,
upsampled to clinical size (512x512x300 full, 256x256x120 with --quick); without it, nibabel's
anatomical.nii is upsampled instead (the result line says which).
Everything runs one thread per worker (ITK, torch, zarr's codec pool) and at one priority, so
"per worker" means one core. Volume rates are output voxels per second: MONAI writes float32, we
and SimpleITK write int16, so bytes would credit MONAI with twice the data for the same voxels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # inherited by Ray workers
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ZARR_THREADING__MAX_WORKERS", "1")  # zarr compresses on a thread pool
# Ray runs workers at nice 15; the baselines run here at nice 0. On a busy machine that alone
# would slow every whole-job figure, so workers get the baselines' priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

CASES: dict[str, Callable[[BenchContext], list[dict]]] = {}
TARGET_SPACING = (1.5, 1.5, 1.5)
BENCH_KEY = b"9d1c7e5b3a0f48e2b6d4c19a7f3e05b8c2a6d90e4f17b3c85a2e6d01f9b47c3e"  # public
VOLUMES = 4  # one task each: enough for 2 workers to stay busy, few enough for --quick


def bench_case(name: str):
    def wrap(fn):
        CASES[name] = fn
        return fn

    return wrap


@dataclass
class BenchContext:
    quick: bool
    work: Path
    ray: object = None
    cache: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        """Contenders alternate for this many rounds; each reports its best round (the one
        least disturbed by other load on the machine), the same rule for all. Five at full
        size: on a 2-core VM the same 1-worker ECG job took 14.6 to 20 s from one minute to
        the next, a drift wider than the margins the targets are judged by."""
        return 2 if self.quick else 5


def result(case: str, ours: float, baseline: float, unit: str, target: float | None, **extra):
    out = {"bench": "ingest", "case": case, "ours": round(ours, 2), "baseline": round(baseline, 2),
           "unit": unit, "ratio": round(ours / baseline, 2) if baseline else None,
           "target": target}  # fmt: skip
    out.update(extra)
    return out


Run = Callable[[], tuple[float, int]]  # -> (seconds, voxels written)


def best_rounds(ctx: BenchContext, contenders: dict[str, Run]) -> dict[str, tuple[float, int]]:
    """Fastest (seconds, voxels) of each contender over ctx.rounds alternating rounds."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(ctx.rounds):
        for name, run in contenders.items():
            got = run()
            best[name] = min(best.get(name, got), got)
    return best


def mvox_s(seconds_voxels: tuple[float, int]) -> float:
    seconds, voxels = seconds_voxels
    return voxels / seconds / 1e6


# ---------------------------------------------------------------- data


def source_volume() -> tuple[sitk.Image, str]:
    root = os.environ.get("MEDFM_SAMPLE_DATA")
    ct = Path(root or "/nonexistent", "totalsegmentator", "example_ct_sm.nii.gz")
    if ct.is_file():
        return sitk.ReadImage(str(ct)), "totalsegmentator example_ct_sm (real CT)"
    import nibabel

    anat = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    return sitk.Cast(sitk.ReadImage(str(anat)), sitk.sitkInt16), "nibabel anatomical.nii"


def clinical_ct(size: tuple[int, int, int]) -> tuple[sitk.Image, str]:
    """The real CT upsampled (linear) to a clinical grid, over the same physical extent."""
    img, what = source_volume()
    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())
    spacing = extent / np.array(size)
    out = sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                        img.GetOrigin(), [float(s) for s in spacing], img.GetDirection(), -1024.0,
                        sitk.sitkInt16)  # fmt: skip
    return out, what


def nifti_files(ctx: BenchContext, n: int = VOLUMES) -> tuple[list[Path], str]:
    size = (256, 256, 120) if ctx.quick else (512, 512, 300)
    key = ("nifti", n, size)
    if key not in ctx.cache:
        folder = ctx.work / f"nifti_{n}_{size[0]}"
        folder.mkdir(parents=True, exist_ok=True)
        vol, what = clinical_ct(size)
        paths = []
        for i in range(n):
            p = folder / f"ct{i:02d}.nii.gz"
            sitk.WriteImage(sitk.Cast(vol + i, sitk.sitkInt16), str(p), useCompression=True)
            paths.append(p)
        ctx.cache[key] = (paths, f"{what} upsampled to {size[0]}x{size[1]}x{size[2]}")
    return ctx.cache[key]


# ---------------------------------------------------------------- runners


def run_ours(ctx: BenchContext, spec: dict, workers: int) -> tuple[float, int]:
    """(seconds, voxels written) for one ingest job on the running Ray runtime."""
    from medfm.ingest.job import run_ingest
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring
    from medfm.shards import Manifest

    dest = Path(tempfile.mkdtemp(dir=ctx.work, prefix="out-"))
    shutil.rmtree(dest)
    t0 = time.perf_counter()
    run_ingest(parse_spec(spec), str(dest), workers=workers, keyring=Keyring(BENCH_KEY),
               progress=False)  # fmt: skip
    dt = time.perf_counter() - t0
    voxels = sum(int(np.prod(r["shape"])) for r in Manifest.open(str(dest)).rows())
    shutil.rmtree(dest)
    return dt, voxels


def task_seconds(since: float) -> float:
    """Seconds Ray spent executing convert_task since `since` (time.time()), from its task
    events: with one worker, a job's wall time minus this is its fixed overhead."""
    import ray

    spans = [e["dur"] for e in ray.timeline()
             if e.get("cat") == "task::convert_task" and e["ts"] >= since * 1e6]  # fmt: skip
    return sum(spans) / 1e6


def ours_in_process(ctx: BenchContext, folder: Path) -> tuple[float, int]:
    """(seconds, voxels written) running each task's body (convert_task: read, reorient,
    resample, intensity, HU histogram, thumbnail hash, Zarr + zstd, sha256 of inputs, voxels
    and stored files, part file) here on one thread: a worker's steady state, no job overhead."""
    from medfm.ingest.bookkeeping import Bookkeeper
    from medfm.ingest.job import discover, plan_tasks
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring
    from medfm.ingest.tasks import convert_task

    spec, keyring = parse_spec(volume_spec(folder)), Keyring(BENCH_KEY)
    items, _, _ = discover(spec, keyring, ray=None)  # NIfTI has no header-scan pass on Ray
    dest = tempfile.mkdtemp(dir=ctx.work, prefix="task-")
    Bookkeeper(dest).start(spec.fingerprint(), keyring, False)
    t0, voxels = time.perf_counter(), 0
    for task in plan_tasks(items, spec):
        part = convert_task(task, spec, keyring, {}, dest)
        voxels += sum(int(np.prod(r["shape"])) for r in part["rows"])
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    return dt, voxels


def volume_spec(folder: Path, fmt: str = "nifti") -> dict:
    return {
        "sources": [{"name": "bench", "root": str(folder), "format": fmt, "modality": "CT"}],
        "volume": {"spacing": list(TARGET_SPACING)},
        "shards": {"task_items": 1},
    }


def sitk_loop(paths: list[Path], out: Path) -> tuple[float, int]:
    """The hand-written baseline of the issue: SimpleITK read, resample to 1.5 mm, np.save
    (no reorientation, no compression, no hashing, no statistics)."""
    t0, voxels = time.perf_counter(), 0
    for p in paths:
        img = sitk.ReadImage(str(p))
        size = np.round(np.array(img.GetSize()) * np.array(img.GetSpacing()) / TARGET_SPACING)
        res = sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                            img.GetOrigin(), TARGET_SPACING, img.GetDirection(), -1024.0,
                            img.GetPixelID())  # fmt: skip
        arr = sitk.GetArrayFromImage(res)
        np.save(out / f"{p.name}.npy", arr)
        voxels += arr.size
    return time.perf_counter() - t0, voxels


def monai_loop(paths: list[Path], out: Path) -> tuple[float, int]:
    """MONAI LoadImage + Orientation + Spacing, then np.save."""
    import torch
    from monai.transforms import Compose, LoadImage, Orientation, Spacing

    torch.set_num_threads(1)
    tf = Compose([LoadImage(image_only=True, ensure_channel_first=True),
                  Orientation(axcodes="LPS"),
                  Spacing(pixdim=TARGET_SPACING, mode="bilinear")])  # fmt: skip
    t0, voxels = time.perf_counter(), 0
    for p in paths:
        arr = np.asarray(tf(str(p)))
        np.save(out / f"{p.name}.npy", arr)
        voxels += arr.size
    return time.perf_counter() - t0, voxels


def warm_up(ctx: BenchContext) -> None:
    """One tiny job on Ray and one conversion here, so that every worker process and this one
    have imported everything before anything is timed."""
    if "warm" in ctx.cache:
        return
    folder = ctx.work / "warm"
    folder.mkdir(exist_ok=True)
    vol, _ = source_volume()
    for i in range(4):  # several tasks, so that every worker process starts and imports
        sitk.WriteImage(vol, str(folder / f"w{i}.nii.gz"))
    run_ours(ctx, volume_spec(folder), workers=2)
    ours_in_process(ctx, folder)
    ctx.cache["warm"] = True


# ---------------------------------------------------------------- cases


@bench_case("nifti_to_zarr_vs_baselines")
def nifti_vs_baselines(ctx: BenchContext) -> list[dict]:
    """Per worker: the Ray task's body in this process against the two loops; then the same
    volumes as one whole 1-worker job, and that job's fixed overhead on its own line."""
    paths, what = nifti_files(ctx)
    warm_up(ctx)
    base = ctx.work / "npy"
    base.mkdir(exist_ok=True)
    folder = paths[0].parent
    overheads: list[float] = []

    def job() -> tuple[float, int]:
        since = time.time()
        got = run_ours(ctx, volume_spec(folder), workers=1)
        overheads.append(got[0] - task_seconds(since))
        return got

    best = best_rounds(ctx, {
        "ours": lambda: ours_in_process(ctx, folder),
        "sitk": lambda: sitk_loop(paths, base),
        "monai": lambda: monai_loop(paths[:2], base),  # the slowest by far: 2 volumes do
        "job": job,
    })  # fmt: skip
    ours, n = mvox_s(best["ours"]), len(paths)
    note = (f"{n} volumes, {what}; ours: the Ray task body, one thread (reorient + resample, "
            f"Zarr+zstd, sha256, HU stats), best of {ctx.rounds} rounds")  # fmt: skip
    job_note = f"{n} volumes; ours: a whole 1-worker Ray job (discovery, tasks, manifest)"
    return [
        result("nifti_zarr_vs_monai_loadimage", ours, mvox_s(best["monai"]), "Mvox/s", 4.4,
               data=note),
        result("nifti_zarr_vs_sitk_loop", ours, mvox_s(best["sitk"]), "Mvox/s", 1.1, data=note),
        result("nifti_zarr_job_vs_sitk_loop", mvox_s(best["job"]), mvox_s(best["sitk"]),
               "Mvox/s", None, data=job_note),
        {"bench": "ingest", "case": "nifti_zarr_job_overhead_1_worker",
         "value": round(min(overheads), 2), "unit": "s", "max": None,
         "data": f"{n}-volume job's wall time minus its tasks' execution (Ray task events): "
                 "discovery, scheduling, part files, manifest"},
    ]  # fmt: skip


@bench_case("scaling_2_vs_1_workers")
def scaling(ctx: BenchContext) -> list[dict]:
    """Whole jobs, one task per volume, workers warm; 1 and 2 workers alternate."""
    paths, what = nifti_files(ctx)
    warm_up(ctx)
    spec = volume_spec(paths[0].parent)
    best = best_rounds(ctx, {w: lambda w=w: run_ours(ctx, spec, workers=int(w)) for w in "12"})
    return [result("ray_2_workers_vs_1", mvox_s(best["2"]), mvox_s(best["1"]), "Mvox/s", 1.7,
                   data=f"{len(paths)} volumes (1 task each), {what}, incl. job overhead, "
                        f"best of {ctx.rounds} rounds")]  # fmt: skip


def dicom_series(ctx: BenchContext) -> tuple[Path, int]:
    """One CT series of 200 slices, as the issue sets it (256x256 with --quick, 512x512 full)."""
    size = (256, 256, 200) if ctx.quick else (512, 512, 200)
    folder = ctx.work / f"dicom_{size[0]}_{size[2]}"
    if not folder.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from ingest_helpers import write_series

        vol, _ = clinical_ct(size)
        write_series(vol, folder)
    return folder, size[2]


def dicom_spec(folder: Path) -> dict:
    spec = volume_spec(folder, "dicom")
    spec["volume"]["spacing"] = None  # as read: ImageSeriesReader does not resample either
    return spec


def dicom_in_process(ctx: BenchContext, folder: Path) -> tuple[float, int]:
    """(seconds, slices) for a worker's steady state on one series: the header scan of
    every file (discovery) and the task body (read, geometry checks, de-identification,
    HU histogram, Zarr + zstd, sha256 of inputs, voxels and stored files, part file)."""
    dt, rows = task_bodies_in_process(ctx, dicom_spec(folder))
    if rows != 1:
        raise SystemExit(f"the bench series became {rows} samples, not one volume")
    return dt, len(list(folder.iterdir()))


def sitk_series_loop(folder: Path, out: Path) -> tuple[float, int]:
    """SimpleITK's ImageSeriesReader (GDCM's header scan to sort the files, then the read),
    then np.save: no geometry checks, de-identification, compression or hashing."""
    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    arr = sitk.GetArrayFromImage(reader.Execute())
    np.save(out / "series.npy", arr)
    return time.perf_counter() - t0, arr.shape[0]


@bench_case("dicom_series_to_zarr_vs_sitk_series_reader")
def dicom_vs_sitk(ctx: BenchContext) -> list[dict]:
    folder, n = dicom_series(ctx)
    warm_up(ctx)
    dicom_in_process(ctx, folder)  # this process imports pydicom's decoders once, untimed
    best = best_rounds(ctx, {
        "ours": lambda: dicom_in_process(ctx, folder),
        "sitk": lambda: sitk_series_loop(folder, ctx.work),
    })  # fmt: skip
    ours_s, _ = run_ours(ctx, dicom_spec(folder), workers=1)
    rate = {k: v[1] / v[0] for k, v in best.items()}
    edge = 256 if ctx.quick else 512
    return [
        result("dicom_series_vs_sitk_imageseriesreader", rate["ours"], rate["sitk"], "files/s",
               1.0, data=f"{n} slices of {edge}x{edge}; ours: header scan + the Ray task body, "
                         f"one thread, best of {ctx.rounds} rounds"),
        result("dicom_series_job_vs_sitk_imageseriesreader", n / ours_s, rate["sitk"],
               "files/s", None, data=f"{n} slices; ours: a whole 1-worker Ray job"),
    ]  # fmt: skip


# ---------------------------------------------------------------- signals and EHR


ECG_RECORDS = 200  # full mode: enough 30-min records (36,000 windows) to amortise job start-up
MIMIC_COPIES = 20  # full mode: the demo's 100 patients, 20 times over (2,000 patients)
MIMIC_ID_COLUMNS = ("subject_id", "hadm_id", "stay_id")
MIMIC_ID_OFFSET = 100_000_000  # above every MIMIC-IV id: copy k's ids are id + k * this


def ecg_records(ctx: BenchContext, n: int | None = None) -> tuple[Path, int, str]:
    """Copies of MIT-BIH record 100, each shifted by a few frames so no window is a duplicate."""
    n = n or (4 if ctx.quick else ECG_RECORDS)
    folder = ctx.work / f"ecg_{n}"
    wfdb_dir = Path(os.environ.get("MEDFM_SAMPLE_DATA", "/nonexistent"), "wfdb")
    if not (wfdb_dir / "100.hea").is_file():
        raise SystemExit("signal benches need MEDFM_SAMPLE_DATA (MIT-BIH record 100)")
    if not folder.exists():
        folder.mkdir(parents=True)
        dat, hea = (wfdb_dir / "100.dat").read_bytes(), (wfdb_dir / "100.hea").read_text()
        frames = 648000 if ctx.quick else 650000
        for i in range(n):  # format 212: 3 bytes per 2-lead frame
            name = f"r{i:03d}"
            (folder / f"{name}.dat").write_bytes(dat[3 * i :] + dat[: 3 * i])
            (folder / f"{name}.hea").write_text(
                hea.replace("100.dat", f"{name}.dat").replace("100 2 360 650000",
                                                              f"{name} 2 360 {frames}")
            )  # fmt: skip
    return folder, n, f"{n} x MIT-BIH 100 (30 min, 2 leads, 360 Hz) -> 10 s windows at 500 Hz"


def ecg_spec(folder: Path) -> dict:
    return {
        "sources": [{"name": "ecg", "root": str(folder), "format": "wfdb"}],
        "signal": {"target_rate": 500},
    }  # fmt: skip  (task sizing: the default)


def wfdb_loop(folder: Path, out: Path) -> tuple[float, int]:
    """The plain baseline: wfdb.rdrecord + resample_poly to 500 Hz + np.save per 10 s window."""
    import wfdb
    from scipy.signal import resample_poly

    out.mkdir(exist_ok=True)
    t0, windows = time.perf_counter(), 0
    for hea in sorted(folder.glob("*.hea")):
        rec = wfdb.rdrecord(str(hea.with_suffix("")))
        x = resample_poly(rec.p_signal.T, 25, 18, axis=1).astype(np.float32)
        for i in range(x.shape[1] // 5000):
            np.save(out / f"{hea.stem}_{i}.npy", x[:, i * 5000 : (i + 1) * 5000])
            windows += 1
    return time.perf_counter() - t0, windows


def run_counted(ctx: BenchContext, spec: dict, workers: int, count) -> tuple[float, int]:
    """(seconds, count(rows)) for one ingest job on the running Ray runtime."""
    from medfm.ingest.job import run_ingest
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring
    from medfm.shards import Manifest

    dest = Path(tempfile.mkdtemp(dir=ctx.work, prefix="out-"))
    shutil.rmtree(dest)
    t0 = time.perf_counter()
    run_ingest(parse_spec(spec), str(dest), workers=workers, keyring=Keyring(BENCH_KEY),
               progress=False)  # fmt: skip
    dt = time.perf_counter() - t0
    n = count(list(Manifest.open(str(dest)).rows()))
    shutil.rmtree(dest)
    return dt, n


def task_bodies_in_process(ctx: BenchContext, spec: dict) -> tuple[float, int]:
    """(seconds, rows written) running discovery and each task's body (convert_task: read,
    resample, windows, quality, norm, labels, npy, sha256, tar, part file) here on one thread:
    a worker's steady state, no Ray and no manifest."""
    from medfm.ingest.bookkeeping import Bookkeeper
    from medfm.ingest.job import discover, plan_tasks
    from medfm.ingest.load import parse_spec
    from medfm.ingest.privacy import Keyring
    from medfm.ingest.tasks import convert_task

    parsed, keyring = parse_spec(spec), Keyring(BENCH_KEY)
    dest = tempfile.mkdtemp(dir=ctx.work, prefix="task-")
    Bookkeeper(dest).start(parsed.fingerprint(), keyring, False)
    t0, rows = time.perf_counter(), 0
    items, _, _ = discover(parsed, keyring, ray=None)
    for task in plan_tasks(items, parsed):
        rows += len(convert_task(task, parsed, keyring, {}, dest)["rows"])
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    return dt, rows


def per_s(seconds_count: tuple[float, int]) -> float:
    seconds, count = seconds_count
    return count / seconds


@bench_case("ecg_windows_vs_wfdb_loop")
def ecg_vs_wfdb(ctx: BenchContext) -> list[dict]:
    """Per worker: the task bodies here against the wfdb loop; then whole 1- and 2-worker jobs
    on the same records. All four alternate, round by round."""
    folder, n, what = ecg_records(ctx)
    warm, _, _ = ecg_records(ctx, 2)
    run_counted(ctx, ecg_spec(warm), 2, len)  # every worker process imports the readers
    task_bodies_in_process(ctx, ecg_spec(warm))
    spec, base = ecg_spec(folder), ctx.work / "ecg_npy"
    best = best_rounds(ctx, {
        "ours": lambda: task_bodies_in_process(ctx, spec),
        "wfdb": lambda: wfdb_loop(folder, base),
        "job1": lambda: run_counted(ctx, spec, 1, len),
        "job2": lambda: run_counted(ctx, spec, 2, len),
    })  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    rounds = f"best of {ctx.rounds} rounds"
    note = (f"{what}; ours: the Ray task body, one thread (annotations, quality, norm, npy, "
            f"sha256, tar), {rounds}")  # fmt: skip
    return [
        result("ecg_windows_vs_wfdb_resample_npsave", per_s(best["ours"]), per_s(best["wfdb"]),
               "windows/s", 1.0, data=note),
        result("ecg_job_vs_wfdb_resample_npsave", per_s(best["job1"]), per_s(best["wfdb"]),
               "windows/s", None, data=f"{what}; ours: a whole 1-worker Ray job, {rounds}"),
        result("ecg_ray_2_workers_vs_1", per_s(best["job2"]), per_s(best["job1"]), "windows/s",
               1.7, data=f"{what}, default task sizing, incl. job overhead, {rounds}"),
    ]  # fmt: skip


def mimic_root() -> Path:
    root = Path(os.environ.get("MEDFM_SAMPLE_DATA", "/nonexistent"), "mimic-iv-demo-2.2")
    if not root.is_dir():
        raise SystemExit("EHR benches need MEDFM_SAMPLE_DATA (MIMIC-IV demo)")
    return root


def mimic_data(ctx: BenchContext) -> tuple[Path, int, str]:
    """The demo itself with --quick; else its tables replicated MIMIC_COPIES times, written once."""
    if ctx.quick:
        return mimic_root(), 100, "MIMIC-IV demo, 100 patients"
    folder = ctx.work / f"mimic_x{MIMIC_COPIES}"
    if not folder.exists():
        replicate_mimic(mimic_root(), folder, MIMIC_COPIES)
    n = 100 * MIMIC_COPIES
    return folder, n, f"MIMIC-IV demo x{MIMIC_COPIES} with fresh ids, {n} patients"


def replicate_mimic(src: Path, out: Path, copies: int) -> None:
    """The demo tables the MIMIC-IV preset reads, `copies` times over: copy k adds
    k * MIMIC_ID_OFFSET to subject_id, hadm_id and stay_id (new pseudonymous patients, stays
    and admissions); every other column and value is the demo's own text."""
    import pandas as pd

    from medfm.ingest.ehr.presets import MIMIC_IV

    patterns = {MIMIC_IV["patients"]["path"], *(t["path"] for t in MIMIC_IV["tables"])}
    for path in sorted({p for pattern in patterns for p in src.glob(pattern)}):
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        ids = {c: pd.to_numeric(df[c]).astype("Int64") for c in MIMIC_ID_COLUMNS if c in df}
        parts = [df.assign(**{c: v + k * MIMIC_ID_OFFSET for c, v in ids.items()})
                 for k in range(copies)]  # fmt: skip
        dest = out / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(parts).to_csv(dest, index=False,
                                compression={"method": "gzip", "compresslevel": 1})  # fmt: skip


def mimic_spec(root: Path, buckets: int) -> dict:
    return {"sources": [{"name": "mimic", "root": str(root), "format": "mimic_iv",
                         "include": ["hosp/*.csv.gz", "icu/*.csv.gz"],
                         "options": {"buckets": buckets}}],
            "shards": {"task_items": 1}}  # fmt: skip


def pandas_tokenize(root: Path, out: Path) -> tuple[float, int]:
    """The straightforward baseline: pandas read_csv of each MIMIC table with the same mapping,
    concat, group by patient, train-only vocabulary and per-code quantile bins, token lists."""
    import pandas as pd

    from medfm.ingest.ehr.presets import MIMIC_IV
    from medfm.ingest.ehr.spec import TEMPLATE_FIELD

    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    adm = pd.read_csv(root / "hosp" / "admissions.csv.gz", usecols=["hadm_id", "dischtime"])
    frames = []
    for t in MIMIC_IV["tables"]:
        path = next(iter(sorted(root.glob(t["path"]))), None)
        if path is None:
            continue
        df = pd.read_csv(path, low_memory=False)
        if t.get("time_from"):
            df = df.merge(adm, on="hadm_id", how="left")
            time_col = df["dischtime"]
        else:
            time_col = df[t["time"][0]]
            for extra in t["time"][1:]:
                time_col = time_col.fillna(df[extra])
        code = pd.Series(t["code"].split("{")[0], index=df.index)
        for piece in TEMPLATE_FIELD.split(t["code"])[1:]:
            code = code + (df[piece].astype(str) if piece in df else piece)
        value = pd.to_numeric(df[t["value"]], errors="coerce") if t.get("value") else np.nan
        frames.append(pd.DataFrame({"pid": df["subject_id"], "t": pd.to_datetime(time_col),
                                    "code": code, "value": value}))  # fmt: skip
    ev = pd.concat(frames).dropna(subset=["t"]).sort_values(["pid", "t", "code"])
    ev["value"] = ev["value"].astype(float)
    pids = ev["pid"].unique()
    train = set(pids[: int(0.8 * len(pids))])
    tr = ev[ev["pid"].isin(train)]
    counts = tr["code"].value_counts()
    vocab = {c: i + 30 for i, c in enumerate(counts[counts >= 5].index)}
    quantiles = tr.dropna(subset=["value"]).groupby("code")["value"].quantile(
        np.linspace(0.1, 0.9, 9)).unstack()  # fmt: skip
    edges = {c: row.to_numpy() for c, row in quantiles.iterrows()}  # .loc per event is slow
    for pid, g in ev.groupby("pid"):
        toks = []
        for c, v in zip(g["code"], g["value"], strict=True):
            toks.append(vocab.get(c, 1))
            if v == v and c in edges:
                toks.append(int(np.searchsorted(edges[c], v)))
        np.save(out / f"{pid}.npy", np.asarray(toks, np.int32))
    return time.perf_counter() - t0, len(ev)


def _events(rows: list[dict]) -> int:
    return sum(json.loads(r["meta"])["events"] for r in rows)


@bench_case("ehr_tokenization_vs_pandas")
def ehr_vs_pandas(ctx: BenchContext) -> list[dict]:
    """Whole 1- and 2-worker jobs against the pandas loop on the same tables, alternating."""
    root, _, what = mimic_data(ctx)
    run_counted(ctx, mimic_spec(mimic_root(), 4), 2, _events)  # warm the workers' imports
    spec, base = mimic_spec(root, 4 if ctx.quick else 8), ctx.work / "ehr_npy"
    best = best_rounds(ctx, {
        "job1": lambda: run_counted(ctx, spec, 1, _events),
        "pandas": lambda: pandas_tokenize(root, base),
        "job2": lambda: run_counted(ctx, spec, 2, _events),
    })  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    note = (f"{what}, {best['job1'][1]} events (pandas: {best['pandas'][1]}); ours: 1-worker "
            "Ray job incl. partition, train-only fit, tokenization, sha256, manifest; "
            f"best of {ctx.rounds} rounds")  # fmt: skip
    return [
        result("ehr_events_vs_pandas_groupby", per_s(best["job1"]), per_s(best["pandas"]),
               "events/s", 1.0, data=note),
        result("ehr_ray_2_workers_vs_1", per_s(best["job2"]), per_s(best["job1"]), "events/s",
               1.7, data=f"{what}; every pass's tasks (scan, partition, clean, MEDS, "
                         "conversion) capped by workers"),
    ]  # fmt: skip


def import_baselines() -> None:
    import monai.transforms  # noqa: F401
    import pandas  # noqa: F401
    import scipy.signal  # noqa: F401
    import wfdb  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, < 60 s")
    ap.add_argument("--case", action="append", help="run only these cases")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    import ray

    with tempfile.TemporaryDirectory(prefix="medfm-bench-ingest-") as tmp:
        ctx = BenchContext(args.quick, Path(tmp))
        t0 = time.perf_counter()
        # The baselines' imports (MONAI with torch: ~10 s here) run on a thread while ray.init
        # mostly waits for its processes to start; no timed region includes either.
        imports = threading.Thread(target=import_baselines, daemon=True)
        imports.start()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        imports.join()
        print(f"[bench ingest] ray.init {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        try:
            for name in args.case or list(CASES):
                t1 = time.perf_counter()
                for line in CASES[name](ctx):
                    print(json.dumps(line), flush=True)
                print(f"[bench ingest] {name} {time.perf_counter() - t1:.1f} s "
                      f"(total {time.perf_counter() - t0:.1f} s)", file=sys.stderr)  # fmt: skip
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
