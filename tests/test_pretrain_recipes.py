"""Issue 20: MAE's training transform and lr rule, and the packaged recipes with their --smoke
variants, run for a few steps on real data (PneumoniaMNIST, TotalSegmentator CT, MIMIC-IV demo)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import (
    DECODER,
    TINY,
    base_config,
    ct_shards,
    losses,
    mimic_linked_shards,
    pneumonia_shards,
    run_cli,
)

from medfm.config import ConfigError
from medfm.models import build_encoder
from medfm.pretrain.cli import EXAMPLES
from medfm.pretrain.config import DEFAULT_LR, load_config, resolved_lr
from medfm.pretrain.objectives import OBJECTIVES, Context
from medfm.pretrain.train import run

MAE_PARAMS = {"mask_ratio": 0.75, **DECODER}
RECIPES = ["mae_vitb16_224", "mae3d_vitb_96", "simclr_resnet50", "clip_ehr_base", "dino_vitb16_224"]
# The smoke runs shrink only these (MAE's decoder, DINO's head and local crop size).
SIZES = ("decoder_dim", "decoder_depth", "decoder_heads", "prototypes", "hidden_dim",
         "bottleneck_dim", "local_size")  # fmt: skip


def chest_xrays(sample_data: Path, n: int = 8) -> torch.Tensor:
    npz = sample_data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.exists():
        pytest.skip(f"{npz} is missing")
    images = np.load(npz)["train_images"][:n]
    return torch.from_numpy(images).float()[:, None] / 255.0


VIT = {"name": "vit2d", "img_size": 28, "patch_size": 4, "in_chans": 1, **TINY}


def mae_objective(**params):
    enc = build_encoder(VIT)
    ctx = Context(encoder=enc)
    return OBJECTIVES.build("mae", {**MAE_PARAMS, **params}, ctx, where="objectives[0]"), ctx


# -- MAE's RandomResizedCrop + flip -------------------------------------------------------------


def test_mae_crop_flip_views_differ_keep_shape_and_follow_the_seed(sample_data):
    x = chest_xrays(sample_data)
    mae, ctx = mae_objective(crop_scale=[0.2, 1.0], hflip=True)
    ctx.seed = 7
    a, again = mae.augment(x), mae.augment(x)
    ctx.seed = 8
    other = mae.augment(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, again)  # the step seed fixes the crop: the same after a resume
    assert not torch.allclose(a, other)
    per_sample = (a - x).abs().flatten(1).mean(1)
    assert (per_sample > 1e-3).all(), "every view must differ from its input"


def test_mae_flip_alone_mirrors_exactly_half_the_batch(sample_data):
    x = chest_xrays(sample_data, n=64)
    mae, ctx = mae_objective(hflip=True)
    ctx.seed = 3
    y = mae.augment(x)
    mirrored = torch.isclose(y, x.flip(-1), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(y, x, atol=1e-5).flatten(1).all(1)
    assert (mirrored | kept).all()  # a flip only: no crop, no resampling blur
    assert 16 < int(mirrored.sum()) < 48  # p = 0.5


def test_mae_loss_trains_on_the_augmented_view(sample_data):
    x = chest_xrays(sample_data)
    plain, ctx_a = mae_objective()
    torch.manual_seed(0)
    augmented, ctx_b = mae_objective(crop_scale=[0.2, 1.0], hflip=True)
    augmented.load_state_dict(plain.state_dict())
    augmented._ctx.encoder.load_state_dict(plain.encoder.state_dict())
    ctx_a.seed = ctx_b.seed = 5
    assert not torch.isclose(plain.loss({"data": x})["loss"], augmented.loss({"data": x})["loss"])


@pytest.mark.parametrize(
    ("params", "match"),
    [({"crop_scale": [0.0, 1.0]}, "crop_scale must satisfy"),
     ({"crop_scale": [0.5, 1.2]}, "crop_scale must satisfy")],
)  # fmt: skip
def test_mae_crop_scale_out_of_range_is_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        mae_objective(**params)


def test_mae_crop_flip_refused_for_3d():
    enc = build_encoder({"name": "vit3d", "img_size": [32, 32, 16], "patch_size": [16, 16, 8],
                         **TINY})  # fmt: skip
    with pytest.raises(ConfigError, match="2D images only; this encoder takes volume3d"):
        OBJECTIVES.build("mae", {**MAE_PARAMS, "hflip": True}, Context(encoder=enc), where="o")


# -- the lr rule --------------------------------------------------------------------------------


def config(tmp_path: Path) -> dict:
    cfg = base_config(tmp_path, tmp_path / "shards", VIT, [{"name": "mae", **MAE_PARAMS}])
    cfg["train"].pop("lr")
    return cfg


def test_blr_scales_with_batch_accumulation_and_world_size(tmp_path):
    cfg = load_config(None, ["data.batch_size=64", "train.grad_accum=64"], config(tmp_path))
    cfg.train.blr = 1.5e-4
    assert resolved_lr(cfg, 1) == pytest.approx(1.5e-4 * 4096 / 256)  # MAE's 2.4e-3
    assert resolved_lr(cfg, 8) == pytest.approx(1.5e-4 * 64 * 64 * 8 / 256)
    cfg.train.grad_accum = 1
    assert resolved_lr(cfg, 1) == pytest.approx(1.5e-4 * 64 / 256)
    cfg.train.blr, cfg.train.lr = None, 3e-4
    assert resolved_lr(cfg, 8) == 3e-4  # a fixed lr is not scaled
    cfg.train.lr = None
    assert resolved_lr(cfg, 8) == DEFAULT_LR


def test_lr_and_blr_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr \(0.001\) and train\.blr \(0.00015\)"):
        load_config(None, ["train.lr=1e-3", "train.blr=1.5e-4"], config(tmp_path))


def test_fingerprint_unchanged_without_blr():
    """Runs from before blr existed (lr unset or 1.5e-4) keep their fingerprint: resumable."""
    cfg = base_config(Path("/runs"), Path("shards/cxr"), VIT, [{"name": "mae", **MAE_PARAMS}])
    cfg["train"].pop("lr")
    before_blr = "7b7ed39dbb9d1802"  # this config's fingerprint as commit d0de91b computed it
    assert load_config(None, [], cfg).fingerprint() == before_blr
    assert load_config(None, ["train.lr=1.5e-4"], cfg).fingerprint() == before_blr
    assert load_config(None, ["train.blr=1.5e-4"], cfg).fingerprint() != before_blr
    assert load_config(None, ["data.allow_unaudited=true"], cfg).fingerprint() != before_blr


def logged_lr(out_dir: Path) -> float:
    rows = list(csv.DictReader((out_dir / "logs" / "version_0" / "metrics.csv").open()))
    return next(float(r[k]) for r in rows for k in r if k.startswith("lr-AdamW") and r[k])


def test_run_trains_at_and_records_the_resolved_lr(sample_data, tmp_path):
    shards = pneumonia_shards(sample_data, tmp_path / "shards", n=64)
    overrides = ["data.batch_size=8", "train.grad_accum=2", "train.max_steps=2",
                 "train.warmup_steps=1", "train.log_every=1", "train.blr=0.01"]  # fmt: skip
    cfg = load_config(None, [f"data.shards={shards}", *overrides], config(tmp_path))
    run(cfg)
    out = Path(cfg.out_dir)
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["resolved"] == {"lr": pytest.approx(0.01 * 8 * 2 / 256), "effective_batch": 16}
    assert recorded["train"]["blr"] == 0.01 and recorded["train"]["lr"] is None
    assert logged_lr(out) == pytest.approx(0.01 * 16 / 256)  # warmup of 1 step: the peak at once


# -- packaged recipes and their --smoke variants ------------------------------------------------


def recipe_shards(name: str, sample_data: Path, tmp_path: Path) -> list[str]:
    """Overrides pointing a recipe at real sample data of its kind."""
    if name.startswith("clip"):
        dx, rx, _ = mimic_linked_shards(sample_data, tmp_path / "dx", tmp_path / "rx")
        return [f"data.shards={dx}", f"data.pair.shards={rx}"]
    if name.startswith("mae3d"):
        return [f"data.shards={ct_shards(sample_data, tmp_path / 'ct')}"]
    return [f"data.shards={pneumonia_shards(sample_data, tmp_path / 'cxr', n=64)}"]


def objective_settings(cfg) -> list[dict]:
    return [{k: v for k, v in o.items() if k not in SIZES} for o in cfg.objectives]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_smoke_variant_trains_with_the_recipe_objective(name, sample_data, tmp_path):
    path = EXAMPLES / f"{name}.yaml"
    where = recipe_shards(name, sample_data, tmp_path) + [f"out_dir={tmp_path / 'run'}"]
    full, smoke = load_config(path, where), load_config(path, where, smoke=True)
    assert objective_settings(smoke) == objective_settings(full)
    assert (smoke.train.lr, smoke.train.blr) == (full.train.lr, full.train.blr)
    summary = run(smoke)
    assert summary["steps"] == smoke.train.max_steps <= 3
    values = losses(smoke.out_dir)
    assert values and all(math.isfinite(v) for v in values)


def test_mae_vitb16_recipe_has_the_published_settings(tmp_path):
    cfg = load_config(EXAMPLES / "mae_vitb16_224.yaml", [])
    (mae,) = cfg.objectives
    assert (mae["mask_ratio"], mae["norm_pix_loss"], mae["crop_scale"], mae["hflip"]) == (
        0.75, True, [0.2, 1.0], True)  # fmt: skip
    assert (cfg.model["size"], cfg.model["img_size"], cfg.model["patch_size"]) == ("base", 224, 16)
    assert cfg.data.batch_size * cfg.train.grad_accum == 4096
    assert resolved_lr(cfg, 1) == pytest.approx(2.4e-3)  # blr 1.5e-4 x 4096 / 256


def test_dino_vitb16_recipe_has_the_published_settings():
    cfg = load_config(EXAMPLES / "dino_vitb16_224.yaml", [])
    (dino,) = cfg.objectives
    assert (dino["prototypes"], dino["local_crops"], dino["local_size"]) == (65536, 10, 96)
    assert (dino["global_scale"], dino["local_scale"]) == ([0.32, 1.0], [0.05, 0.32])
    assert (dino["student_temp"], dino["teacher_temp_start"], dino["teacher_temp"]) == (
        0.1, 0.04, 0.07)  # fmt: skip
    assert (dino["momentum"], dino["momentum_end"], dino["koleo_weight"]) == (0.992, 1.0, 0.1)
    assert dino["schedule_steps"] == cfg.train.max_steps
    assert (cfg.model["size"], cfg.model["img_size"], cfg.model["patch_size"]) == ("base", 224, 16)
    assert cfg.data.batch_size * cfg.train.devices == 1024 and cfg.train.lr == 4e-3
    assert cfg.train.weight_decay == 0.04  # DINOv2's start value; the 0.4 end is not scheduled


def test_smoke_flag_of_the_cli(sample_data, tmp_path):
    shards = pneumonia_shards(sample_data, tmp_path / "cxr", n=64)
    args = ["--config", str(EXAMPLES / "mae_vitb16_224.yaml"), "--smoke",
            f"data.shards={shards}", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exported:" in done.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["max_steps"] == 2


def test_smoke_flag_without_a_smoke_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no smoke overrides"):
        load_config(None, [], config(tmp_path), smoke=True)
