"""Issue 17, end to end per modality: real files go through the ingest job, a tiny encoder
pretrains on the resulting shard set, and every field the encoder uses arrives unchanged.

The ingest runs through `run_ingest`, the entry point `medfm ingest` calls (one module-scoped Ray
runtime: a subprocess per test would start Ray three times), and pretraining through
`medfm.pretrain.train.build`/`run`, which `medfm pretrain` calls. The batch checked is the first
one the data module of the pretrain engine (`PretrainData.module`) yields. The EHR case is
tests/test_ehr_realworld.py::test_ingested_time_and_age_reach_the_model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_helpers import KEY
from PIL import Image
from pretrain_helpers import DECODER, TINY, base_config

from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.pretrain.config import load_config
from medfm.pretrain.train import build, run
from medfm.shards import Manifest

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

ALL_TRAIN = {"fractions": [1.0, 0.0, 0.0]}  # every sample reaches the training split


def ingest(spec: dict, dest: Path) -> list[dict]:
    summary = run_ingest(parse_spec(spec), str(dest), keyring=Keyring(KEY), progress=False)
    assert summary.written > 0 and summary.quarantined == 0, summary
    return list(Manifest.open(str(dest)).rows(decode_json=True))


def first_batch(tree: dict) -> tuple[dict, object]:
    """The first batch the pretrain engine's data module yields, and the PretrainData."""
    _, data = build(load_config(None, base=tree))
    return next(iter(data.module.train_dataloader())), data


def pretrain(tree: dict, steps: int = 2) -> dict:
    """A short real run; returns the exported encoder sidecar."""
    tree["train"].update(max_steps=steps, log_every=1)
    assert run(load_config(None, base=tree))["steps"] == steps
    return json.loads((Path(tree["out_dir"]) / "export" / "encoder.json").read_text())


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
    stored = {r["key"]: r for r in ingest(spec, out)}
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

    side = pretrain(tree)
    pre = side["preprocessing"]
    assert pre["kind"] == "image2d" and pre["intensity"] == "auto"
    assert pre["source"]["modality"] == "DX" and pre["source"]["spacing"] == []


# ---------------------------------------------------------------- signal


def test_mitbih_windows_reach_the_1d_mae_unchanged(ray_local, sample_data, tmp_path):
    """MIT-BIH record 100 -> ingest to 10 s windows at the native 360 Hz, no ingest-time
    normalisation -> 1D MAE: the leads' names and rate arrive, and each window in the batch is
    the wfdb-read signal at the row's window_start_s, z-scored over both leads (the contract)."""
    import wfdb

    spec = {
        "sources": [{"name": "mitdb", "root": str(sample_data / "wfdb"), "include": ["100.hea"],
                     "format": "wfdb", "patient_id": {"from": "stem"}}],
        "signal": {"target_rate": None, "window_s": 10, "normalize": "none"},
        "split": ALL_TRAIN,
    }  # fmt: skip
    out = tmp_path / "shards"
    rows = {r["key"]: r for r in ingest(spec, out)}
    rec = wfdb.rdrecord(str(sample_data / "wfdb" / "100"))
    assert len(rows) == rec.sig_len // (10 * 360)  # every whole window, none dropped
    for r in rows.values():
        assert r["channels"] == ["MLII", "V5"] and r["sampling_rate"] == 360.0
        assert r["shape"] == [2, 3600] and r["meta"]["source_rate"] == 360.0

    model = {"name": "signal_vit", "num_leads": 2, "length": 3600, "patch_size": 36, **TINY}
    tree = base_config(tmp_path, out, model, [{"name": "mae", "mask_ratio": 0.5, **DECODER}])
    tree["data"]["batch_size"] = 8
    batch, _ = first_batch(tree)
    assert batch["data"].shape == (8, 2, 3600)
    source = torch.from_numpy(rec.p_signal.T.astype(np.float32))  # (leads, T) in mV
    for key, x in zip(batch["key"], batch["data"], strict=True):
        start = round(rows[key]["meta"]["window_start_s"] * 360)
        w = source[:, start : start + 3600]
        torch.testing.assert_close(x, (w - w.mean()) / (w.std() + 1e-6), rtol=0, atol=1e-5)

    side = pretrain(tree)
    pre = side["preprocessing"]
    assert pre["kind"] == "signal" and pre["signal_length"] == 3600
    assert pre["source"]["channels"] == ["MLII", "V5"] and pre["source"]["sampling_rate"] == 360.0
