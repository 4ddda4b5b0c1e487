"""Tiny encoders train on real shards on CPU and their loss drops (one test per modality and
objective family), writing checkpoints, PNGs and an export on the way."""

from __future__ import annotations

import json

import pytest
from pretrain_helpers import (
    DECODER,
    TINY,
    assert_drops,
    base_config,
    ct_shards,
    ecg_shards,
    losses,
    mimic_linked_shards,
    pneumonia_shards,
)

from medfm.pretrain.config import load_config
from medfm.pretrain.train import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def fit(tree: dict) -> dict:
    return run(load_config(None, base=tree))


def test_mae2d_on_chest_xrays(tmp_path, sample_data):
    shards = pneumonia_shards(sample_data, tmp_path / "pm")
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    tree = base_config(tmp_path, shards, model, [{"name": "mae", **DECODER}], plots=True,
                       checkpoint_every=15, ema_decay=0.9, layer_decay=0.8)  # fmt: skip
    summary = fit(tree)
    assert summary["steps"] == 30
    assert_drops(losses(tree["out_dir"]), 0.8)
    out = tmp_path / "run"
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "plots" / "mae_step0000015.png").stat().st_size > 1000  # reconstruction grid
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "tensorboard").exists() is False  # loggers=["csv"] in the test config
    perf = json.loads((out / "throughput.json").read_text())
    assert perf["samples_per_s"] > 0 and 0 <= perf["data_wait_fraction"] <= 1
    # masking is accounted for: the encoder sees a quarter of the 49 tokens
    assert perf["flops_per_sample"] > 0


def test_mae3d_on_totalsegmentator_ct(tmp_path, sample_data):
    shards = ct_shards(sample_data, tmp_path / "ct")
    model = {"name": "vit3d", "img_size": [32, 32, 16], "patch_size": [8, 8, 4], **TINY}
    tree = base_config(tmp_path, shards, model, [{"name": "mae", **DECODER}], max_steps=30)
    tree["data"].update(batch_size=8, patches_per_volume=16)
    fit(tree)
    assert_drops(losses(tree["out_dir"]), 0.8)


def test_mae1d_on_mitbih_ecg(tmp_path, sample_data):
    shards = ecg_shards(sample_data, tmp_path / "ecg")
    model = {"name": "signal_vit", "num_leads": 2, "length": 720, "patch_size": 18, **TINY}
    objective = [{"name": "mae", "mask_ratio": 0.5, **DECODER}]
    tree = base_config(tmp_path, shards, model, objective, max_steps=100, log_every=10)
    fit(tree)
    assert_drops(losses(tree["out_dir"]), 0.97)


def test_simclr_on_chest_xrays(tmp_path, sample_data):
    shards = pneumonia_shards(sample_data, tmp_path / "pm")
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    views = {"crop_scale": [0.7, 1.0], "jitter": 0.1, "noise": 0.02}
    tree = base_config(tmp_path, shards, model, [{"name": "simclr", "views": views}],
                       max_steps=60, lr=3e-4)  # fmt: skip
    tree["data"]["batch_size"] = 32
    fit(tree)
    assert_drops(losses(tree["out_dir"]), 0.97)


def test_cross_modal_clip_on_linked_ehr(tmp_path, sample_data):
    """Diagnoses <-> drug orders of the same MIMIC-IV demo admission, plus masked-code
    modeling on the diagnoses (a hybrid objective from config alone)."""
    dx, rx, vocab = mimic_linked_shards(sample_data, tmp_path / "dx", tmp_path / "rx")
    model = {"name": "ehr_transformer", "vocab_size": vocab, "max_tokens": 48, **TINY}
    objectives = [{"name": "clip"}, {"name": "mcm", "weight": 0.5}]
    tree = base_config(tmp_path, dx, model, objectives)
    tree["pair_model"] = dict(model)
    tree["data"]["pair"] = {"shards": str(rx), "join": "study_id"}
    fit(tree)
    assert_drops(losses(tree["out_dir"], "train/clip/loss"), 0.9)
    assert_drops(losses(tree["out_dir"], "train/mcm/loss"), 0.97)
    export = tmp_path / "run" / "export"
    assert (export / "pair_encoder.safetensors").exists()
    side = json.loads((export / "encoder.json").read_text())
    assert side["preprocessing"]["kind"] == "ehr" and side["preprocessing"]["max_tokens"] == 48
