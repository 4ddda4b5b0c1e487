"""Real-data shard sets and config builders for the pretraining tests (tiny, fast)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medfm.shards import Geometry, Sample, ShardSetWriter
from medfm.shards.schema import EHR_TIME

TINY = {"size": "tiny", "embed_dim": 64, "depth": 2, "num_heads": 4}
DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


def pneumonia_shards(data: Path, root: Path, n: int = 256) -> Path:
    """PneumoniaMNIST chest X-rays (28x28 uint8) as an image2d shard set."""
    npz = data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.exists():
        import pytest

        pytest.skip(f"{npz} is missing")
    arrays = np.load(npz)
    images, labels = arrays["train_images"][:n], arrays["train_labels"][:n, 0]
    with ShardSetWriter(str(root), shard_max_bytes=64 * 1024) as w:
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            w.write(
                Sample(
                    key=f"pmnist-{i:05d}", kind="image2d", modality="DX", dataset="pneumoniamnist",
                    patient_id=f"p{i:05d}", split="train", data=img, labels={"class": int(y)},
                )
            )  # fmt: skip
    return root


def ct_shards(data: Path, root: Path) -> Path:
    """The TotalSegmentator abdominal CT (122x101x30) as a volume3d shard set."""
    import nibabel as nib

    img = nib.load(data / "totalsegmentator" / "example_ct_sm.nii.gz")
    vol = np.asarray(img.dataobj).astype(np.int16)
    with ShardSetWriter(str(root), chunks=(32, 32, 16)) as w:
        w.write(
            Sample(
                key="ts-ct-0", kind="volume3d", modality="CT", dataset="totalsegmentator",
                patient_id="ts0", split="train", data=vol,
                geometry=Geometry.from_nifti_affine(img.affine),
            )
        )  # fmt: skip
    return root


def ecg_shards(data: Path, root: Path, segment_s: int = 20, n: int = 40) -> Path:
    """MIT-BIH record 100 (MLII, V5 at 360 Hz) cut into 20 s segments, one sample each."""
    import wfdb

    rec = wfdb.rdrecord(str(data / "wfdb" / "100"))
    sig = rec.p_signal.T.astype(np.float32)
    step = segment_s * int(rec.fs)
    with ShardSetWriter(str(root)) as w:
        for i in range(min(n, sig.shape[1] // step)):
            w.write(
                Sample(
                    key=f"mitbih-100-{i:03d}", kind="signal", modality="ECG", dataset="mitbih",
                    patient_id="mitbih100", split="train", data=sig[:, i * step : (i + 1) * step],
                    sampling_rate=float(rec.fs), channels=list(rec.sig_name),
                )
            )  # fmt: skip
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


def mimic_linked_shards(data: Path, root_dx: Path, root_rx: Path) -> tuple[Path, Path, int]:
    """MIMIC-IV demo admissions as two linked EHR modalities: diagnosis codes and drug orders
    (with hours since admission), joined on study_id = admission. Returns (dx, rx, vocab)."""
    hosp = data / "mimic-iv-demo-2.2" / "hosp"
    age = {r["subject_id"]: int(r["anchor_age"]) for r in _read_csv(hosp / "patients.csv.gz")}
    admit = {
        r["hadm_id"]: np.datetime64(r["admittime"]) for r in _read_csv(hosp / "admissions.csv.gz")
    }
    dx, rx = defaultdict(list), defaultdict(list)
    subject = {}
    for r in _read_csv(hosp / "diagnoses_icd.csv.gz"):
        dx[r["hadm_id"]].append((int(r["seq_num"]), f"icd{r['icd_version']}:{r['icd_code']}"))
        subject[r["hadm_id"]] = r["subject_id"]
    for r in _read_csv(hosp / "prescriptions.csv.gz"):
        if r["hadm_id"] in admit and r["starttime"]:
            hours = (np.datetime64(r["starttime"]) - admit[r["hadm_id"]]) / np.timedelta64(1, "h")
            rx[r["hadm_id"]].append((float(hours), f"drug:{r['drug'].lower()}"))
    vocab = {
        c: i + 1
        for i, c in enumerate(sorted({c for v in (*dx.values(), *rx.values()) for _, c in v}))
    }
    both = sorted(set(dx) & set(rx))
    for root, table in ((root_dx, dx), (root_rx, rx)):
        with ShardSetWriter(str(root)) as w:
            for hadm in both:
                events = sorted(table[hadm])
                s = Sample(
                    key=f"{'dx' if table is dx else 'rx'}-{hadm}", kind="ehr", modality="EHR",
                    dataset="mimic-iv-demo", patient_id=subject[hadm], study_id=hadm,
                    split="train", data=np.array([vocab[c] for _, c in events], np.int64),
                    labels={"age": age[subject[hadm]]},
                )  # fmt: skip
                if table is rx:
                    s.extras = {EHR_TIME: np.array([t for t, _ in events], np.float32)}
                w.write(s)
    return root_dx, root_rx, len(vocab) + 2  # + PAD and [MASK]


def base_config(tmp: Path, shards: Path, model: dict, objectives: list, **train: Any) -> dict:
    return {
        "name": "test",
        "out_dir": str(tmp / "run"),
        "data": {"shards": str(shards), "batch_size": 16, "num_workers": 0},
        "model": model,
        "objectives": objectives,
        "train": {
            "max_steps": 30, "lr": 1e-3, "warmup_steps": 3, "checkpoint_every": 1000,
            "log_every": 5, "plots": False, "loggers": ["csv"], **train,
        },
    }  # fmt: skip


def losses(out_dir: str | Path, column: str = "train/loss") -> list[float]:
    """The logged per-step training losses from the CSV logger."""
    rows = list(csv.DictReader((Path(out_dir) / "logs" / "version_0" / "metrics.csv").open()))
    return [float(r[column]) for r in rows if r.get(column)]


def assert_drops(values: list[float], factor: float = 0.9) -> None:
    k = max(2, len(values) // 5)
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    assert last < factor * first, f"loss did not drop: first {first:.4f}, last {last:.4f}"


def write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run_cli(args: list[str], timeout_s: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """`medfm pretrain ...` in a fresh process with one compute thread. Its own session, so
    that a run past `timeout_s` is killed with every process it started (DDP's other ranks)
    and the test fails with what the run printed, not a bare timeout."""
    env = {**kw.pop("env", os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "medfm"
    cmd = [str(exe), "pretrain", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, **kw)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"medfm pretrain ran past {timeout_s} s; its output:\n{out[-3000:]}\n{err[-6000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
