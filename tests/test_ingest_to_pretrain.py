"""Issue 17, end to end per modality: real files go through the ingest job, a tiny encoder
pretrains on the resulting shard set, and every field the encoder uses arrives unchanged.

`medfm ingest` and `medfm pretrain` run as subprocesses, as a user runs them; the ingest joins
the test module's Ray runtime through --address (one Ray start for the module). The batch checked
is the first one the pretrain engine's data module (`PretrainData.module`, built by
`medfm.pretrain.train.build` from the same config) yields. The EHR case is
tests/test_ehr_realworld.py::test_ingested_time_and_age_reach_the_model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_helpers import KEY
from PIL import Image
from pretrain_helpers import DECODER, TINY, base_config, run_cli, write_yaml

from medfm.pretrain.config import load_config
from medfm.pretrain.train import build
from medfm.shards import Manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # two CLI runs each

MEDFM = str(Path(sys.executable).parent / "medfm")
ALL_TRAIN = {"fractions": [1.0, 0.0, 0.0]}  # every sample reaches the training split


def ingest_cli(ray, spec: dict, dest: Path) -> list[dict]:
    """`medfm ingest` in a subprocess, on the test module's Ray runtime (--address)."""
    spec_path = write_yaml(spec, dest.parent / "spec.yaml")
    env = {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [MEDFM, "ingest", str(spec_path), "--out", str(dest), "--address", address, "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["written"] > 0 and summary["quarantined"] == 0, summary
    return list(Manifest.open(str(dest)).rows(decode_json=True))


def pretrain_cli(tree: dict, steps: int = 2) -> dict:
    """`medfm pretrain --config` in a subprocess; returns the exported encoder sidecar."""
    tree["train"].update(max_steps=steps, log_every=1)
    res = run_cli(["--config", str(write_yaml(tree, Path(tree["out_dir"]).parent / "run.yaml"))])
    assert res.returncode == 0, res.stderr[-3000:]
    side = json.loads((Path(tree["out_dir"]) / "export" / "encoder.json").read_text())
    root = tree["data"]["shards"]  # the sidecar names the ingested shard set it trained on
    assert side["data"]["manifests"] == {root: Manifest.open(root).header["manifest"]["sha256"]}
    assert side["training"]["steps"] == steps
    return side


def first_batch(tree: dict) -> tuple[dict, object]:
    """The first batch the pretrain engine's data module yields, and the PretrainData."""
    _, data = build(load_config(None, base=tree))
    return next(iter(data.module.train_dataloader())), data


# ---------------------------------------------------------------- image2d


def test_png_chest_xrays_reach_the_mae_unchanged(ray_local, sample_data, tmp_path):
    """PneumoniaMNIST PNGs + labels.csv -> ingest -> MAE ViT: every image in the batch is a
    source PNG's pixels / 255 (8-bit images scaled to [0, 1]), and the sidecar says so."""
    npz = sample_data / "pneumoniamnist" / "pneumoniamnist.npz"
    images, labels = np.load(npz)["train_images"][:24], np.load(npz)["train_labels"][:24, 0]
    src = tmp_path / "cxr"
    (src / "img").mkdir(parents=True)
    by_sha, rows = {}, ["image_id,pneumonia,patient_id"]
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        path = src / "img" / f"cxr{i:03d}.png"
        Image.fromarray(img).save(path)
        by_sha[hashlib.sha256(path.read_bytes()).hexdigest()] = (img, int(y))
        rows.append(f"cxr{i:03d},{int(y)},pt{i:03d}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = {
        "sources": [{"name": "pmnist", "root": str(src), "include": ["img/*.png"],
                     "format": "png", "modality": "DX", "patient_id": {"from": "table"},
                     "labels_table": {"path": str(src / "labels.csv"), "key": "image_id",
                                      "match": "stem", "columns": ["pneumonia"]}}],
        "split": ALL_TRAIN,
    }  # fmt: skip
    out = tmp_path / "shards"
    stored = {r["key"]: r for r in ingest_cli(ray_local, spec, out)}
    assert len(stored) == 24
    source_of = {}
    for key, r in stored.items():  # hash_paths: the source is found by its bytes' sha256
        (digest,) = r["provenance"]["inputs"].values()
        img, y = by_sha[digest]
        assert r["labels"] == {"pneumonia": y} and r["shape"] == [28, 28]
        source_of[key] = img

    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, "in_chans": 1, **TINY}
    tree = base_config(tmp_path, out, model, [{"name": "mae", **DECODER}])
    tree["data"]["batch_size"] = 8
    batch, _ = first_batch(tree)
    assert batch["data"].shape == (8, 1, 28, 28) and batch["data"].dtype == torch.float32
    for key, x in zip(batch["key"], batch["data"], strict=True):
        img = torch.from_numpy(source_of[key])
        assert torch.equal((x[0] * 255).round().to(torch.uint8), img), key  # every grey level
        torch.testing.assert_close(x[0], img / 255.0, rtol=0, atol=1e-7)  # x * float32(1/255)

    side = pretrain_cli(tree)
    pre = side["preprocessing"]
    assert pre["kind"] == "image2d" and pre["intensity"] == "auto"
    assert pre["channels"] == 1 and pre["image_size"] == 28
    assert pre["source"]["modality"] == "DX" and pre["source"]["spacing"] == []


# ---------------------------------------------------------------- signal


@pytest.mark.parametrize("rate", [None, 500])  # native 360 Hz, and the spec's default 500 Hz
def test_mitbih_windows_reach_the_1d_mae_unchanged(ray_local, sample_data, tmp_path, rate):
    """MIT-BIH record 100 -> ingest to 10 s windows, no ingest-time normalisation -> 1D MAE: the
    leads' names and rate arrive, and each window in the batch is the wfdb-read signal (resampled
    as documented: scipy's resample_poly over the whole record) at the row's window_start_s,
    z-scored over both leads (the contract). Equal to float32 rounding, not bit for bit: the
    ingest reads and resamples in float32, the reference in float64."""
    import wfdb
    from scipy.signal import resample_poly

    spec = {
        "sources": [{"name": "mitdb", "root": str(sample_data / "wfdb"), "include": ["100.hea"],
                     "format": "wfdb", "patient_id": {"from": "stem"}}],
        "signal": {"target_rate": rate, "window_s": 10, "normalize": "none"},
        "split": ALL_TRAIN,
    }  # fmt: skip
    out = tmp_path / "shards"
    rows = {r["key"]: r for r in ingest_cli(ray_local, spec, out)}
    rec = wfdb.rdrecord(str(sample_data / "wfdb" / "100"))
    fs = rate or 360
    signal = rec.p_signal.T if rate is None else resample_poly(rec.p_signal.T, 25, 18, axis=1)
    assert len(rows) == signal.shape[1] // (10 * fs)  # every whole window, none dropped
    for r in rows.values():
        assert r["channels"] == ["MLII", "V5"] and r["sampling_rate"] == float(fs)
        assert r["shape"] == [2, 10 * fs] and r["meta"]["source_rate"] == 360.0

    model = {"name": "signal_vit", "num_leads": 2, "length": 10 * fs, "patch_size": fs // 10,
             **TINY}  # fmt: skip
    tree = base_config(tmp_path, out, model, [{"name": "mae", "mask_ratio": 0.5, **DECODER}])
    tree["data"]["batch_size"] = 8
    batch, _ = first_batch(tree)
    assert batch["data"].shape == (8, 2, 10 * fs)
    source = torch.from_numpy(signal.astype(np.float32))  # (leads, T) in mV
    for key, x in zip(batch["key"], batch["data"], strict=True):
        start = round(rows[key]["meta"]["window_start_s"] * fs)
        w = source[:, start : start + 10 * fs]
        torch.testing.assert_close(x, (w - w.mean()) / (w.std() + 1e-6), rtol=0, atol=1e-5)

    side = pretrain_cli(tree)
    pre = side["preprocessing"]
    assert pre["kind"] == "signal" and pre["signal_length"] == 10 * fs
    assert pre["source"]["channels"] == ["MLII", "V5"]
    assert pre["source"]["sampling_rate"] == float(fs)


# ---------------------------------------------------------------- volume3d


def locate(patch: torch.Tensor, volume: torch.Tensor) -> list[tuple[int, ...]]:
    """Starts of every region of `volume` equal to `patch`, searched from its brightest voxel
    (rare in a CT, so few candidates; air would match almost everywhere)."""
    at = torch.tensor(np.unravel_index(int(patch.argmax()), patch.shape))
    found = []
    for start in (torch.nonzero(volume == patch.max()) - at).tolist():
        region = tuple(slice(a, a + n) for a, n in zip(start, patch.shape, strict=True))
        if min(start) >= 0 and volume[region].shape == patch.shape:
            if torch.equal(volume[region], patch):
                found.append(tuple(start))
    return found


def test_totalsegmentator_ct_patches_reach_the_3d_mae_unchanged(ray_local, sample_data, tmp_path):
    """The TotalSegmentator CT (a RAS NIfTI) -> ingest at native spacing, LPS -> 3D MAE on
    patches: the geometry is SimpleITK's after DICOMOrient(LPS), the stored voxels are its HU, and
    every training patch is a region of it, HU-windowed to [0, 1] (the contract's CT default)."""
    import SimpleITK as sitk

    from medfm.models.contract import CT_WINDOW
    from medfm.shards import ShardSet

    nii = sample_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    spec = {
        "sources": [{"name": "ts", "root": str(nii.parent), "include": [nii.name],
                     "format": "nifti", "modality": "CT", "patient_id": {"from": "stem"}}],
        "volume": {"spacing": None, "orientation": "LPS"},  # native grid: no resampling
        "split": ALL_TRAIN,
    }  # fmt: skip
    out = tmp_path / "shards"
    (row,) = ingest_cli(ray_local, spec, out)
    lps = sitk.DICOMOrient(sitk.ReadImage(str(nii)), "LPS")  # RAS file: i and j flip
    source = sitk.GetArrayFromImage(lps).transpose(2, 1, 0)  # (k, j, i) -> the shards' (i, j, k)
    assert row["shape"] == list(source.shape) and row["spacing"] == list(lps.GetSpacing())
    stored = ShardSet(str(out)).read_sample(next(ShardSet(str(out)).rows()))
    np.testing.assert_array_equal(stored.data, source)  # HU, int16, unchanged
    assert stored.geometry.direction == pytest.approx(lps.GetDirection())
    assert stored.geometry.origin == pytest.approx(lps.GetOrigin(), abs=1e-4)

    size = (32, 32, 16)
    model = {"name": "vit3d", "img_size": list(size), "patch_size": [8, 8, 4], **TINY}
    tree = base_config(tmp_path, out, model, [{"name": "mae", **DECODER}])
    tree["data"].update(batch_size=4, patches_per_volume=8)
    batch, data = first_batch(tree)
    assert batch["data"].shape == (4, 1, *size)
    lo, hi = CT_WINDOW
    windowed = torch.from_numpy((source.clip(lo, hi).astype(np.float32) - lo) / (hi - lo))
    for x in batch["data"]:  # the batch does not carry patch_start: find the patch in the CT
        assert locate(x[0], windowed), "a training patch is no region of the source CT"
    ds = data.datasets[0]  # its patch sampler, with the start the batch drops: raw HU there
    p = ds.patches.patch(ds.row(0), 0, np.random.default_rng(0))
    (i, j, k) = p["start"]
    np.testing.assert_array_equal(p["image"], source[i : i + 32, j : j + 32, k : k + 16])

    side = pretrain_cli(tree)
    pre = side["preprocessing"]
    assert pre["kind"] == "volume3d" and pre["patch_size"] == list(size)
    assert pre["source"]["modality"] == "CT" and pre["source"]["spacing"] == [3.0, 3.0, 3.0]
