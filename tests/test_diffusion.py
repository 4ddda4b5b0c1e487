"""Diffusion objectives: registered in the pretrain engine, trained through it on real chest
X-rays, and a tiny 3D model on the real TotalSegmentator CT (train + sample on CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pretrain_helpers import base_config, ct_shards, losses, pneumonia_shards
from torch import nn
from torch.optim.swa_utils import AveragedModel

from medfm.config import ConfigError
from medfm.models.diffusion.export import load_diffusion
from medfm.models.diffusion.model import DiffusionModel
from medfm.models.diffusion.sampling import SamplerSettings, sample
from medfm.pretrain.config import load_config
from medfm.pretrain.objectives import OBJECTIVES, Context
from medfm.pretrain.objectives.diffusion import DiffusionObjective
from medfm.shards import Manifest, ShardSet, verify
from medfm.synth.generate import GenerateOptions, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_UNET = {"channels": [8, 16, 16], "attention_levels": [False, False, True]}


@pytest.mark.parametrize("spatial_dims, size", [(2, [28, 28]), (3, [16, 16, 8])])
def test_registry_builds_2d_and_3d_and_the_loss_is_finite(spatial_dims, size):
    params = {"spatial_dims": spatial_dims, "sample_size": size, **TINY_UNET}
    obj = OBJECTIVES.build("diffusion", params, Context(encoder=None))
    assert isinstance(obj, DiffusionObjective) and set(obj.export_modules()) == {"unet"}
    loss = obj.loss({"data": torch.rand(2, 1, *size)})["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in obj.model.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "params, key",
    [
        ({"sample_size": [30, 30]}, "sample_size"),  # not divisible by 4 (3 levels)
        ({"channels": [8, 12, 16]}, "channels"),  # not divisible by the norm groups
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"sampel_size": [28, 28]}, "sampel_size"),  # typo: unknown key
    ],
)
def test_bad_objective_config_fails_naming_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        OBJECTIVES.build("diffusion", {**TINY_UNET, **params}, Context(encoder=None))


def test_sampling_is_per_seed_whatever_the_batch():
    model = DiffusionModel(OBJECTIVES.config("diffusion", TINY_UNET)).eval()
    s = SamplerSettings("dpm", 4)
    together = sample(model, [7, 8, 9], s)
    alone = sample(model, [8], s)
    torch.testing.assert_close(together[1:2], alone, atol=1e-2, rtol=1e-3)  # batched conv numerics
    assert not torch.allclose(together[0], together[2])


def test_checkpoints_naming_the_unet_on_the_objective_still_load():
    """Runs checkpointed while the objective owned the UNet (`objectives.diffusion.unet.*`, and
    so in its EMA copy) resume: the keys are renamed on load, strictly."""

    def engine_like() -> nn.ModuleDict:
        obj = OBJECTIVES.build("diffusion", TINY_UNET, Context(encoder=None))
        objectives = nn.ModuleDict({"diffusion": obj})
        return nn.ModuleDict({"objectives": objectives, "ema": AveragedModel(objectives)})

    torch.manual_seed(0)
    saved = engine_like().state_dict()
    old = {k.replace(".model.unet.", ".unet."): v for k, v in saved.items()}
    assert any(k.startswith("ema.module.diffusion.unet.") for k in old)
    torch.manual_seed(1)
    resumed = engine_like()
    resumed.load_state_dict(old)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, saved[key])


@pytest.mark.slow
def test_engine_trains_diffusion_and_synth_generates_from_its_export(sample_data, tmp_path):
    from medfm.pretrain.train import run

    shards = pneumonia_shards(sample_data, tmp_path / "pm", n=256)
    # No encoder: the UNet is the model. EMA and checkpoint PNGs come from the same engine.
    objective = {"name": "diffusion", "sample_size": [28, 28], **TINY_UNET}
    base = base_config(tmp_path, shards, None, [objective], max_steps=40, lr=3e-3)
    base["train"] |= {"ema_decay": 0.9, "plots": True, "checkpoint_every": 20}
    cfg = load_config(None, base=base)
    run(cfg)
    values = losses(cfg.out_dir, "train/diffusion/loss")
    assert np.mean(values[-2:]) < 0.6 * np.mean(values[:2]), values
    export = tmp_path / "run" / "export"
    out = tmp_path / "synthetic"
    generate(str(export), str(out), GenerateOptions(n=6, sampler=SamplerSettings("ddim", 5)))
    assert verify(str(out)).ok
    rows = list(Manifest.open(str(out)).rows())
    assert rows[0]["shape"] == [28, 28] and rows[0]["dtype"] == "|u1" and rows[0]["synthetic"]
    assert (tmp_path / "run" / "plots" / "diffusion_step0000040.png").stat().st_size > 1000
    # The export holds the EMA weights, not the last step's.
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu"
    )["state_dict"]
    key = next(k for k in state if k.startswith("objectives.diffusion.model.unet."))
    ema_key = "ema.module." + key.removeprefix("objectives.")
    exported = load_diffusion(export).model.unet.state_dict()[key.split(".unet.", 1)[1]]
    torch.testing.assert_close(exported, state[ema_key])
    assert not torch.equal(exported, state[key])


@pytest.mark.slow
def test_class_conditional_diffusion_trains_through_the_engine(sample_data, tmp_path):
    from medfm.pretrain.train import run

    shards = pneumonia_shards(sample_data, tmp_path / "pm", n=128)
    objective = {"name": "diffusion", "sample_size": [28, 28], "num_classes": 2, **TINY_UNET}
    base = base_config(tmp_path, shards, None, [objective], max_steps=6, lr=3e-3)
    with pytest.raises(ConfigError, match="num_classes.*data.class_key"):
        run(load_config(None, base=base))  # refused before any step: no class labels
    base["data"]["class_key"] = "class"
    run(load_config(None, base=base))
    loaded = load_diffusion(tmp_path / "run" / "export")
    assert loaded.classes == [0, 1] and loaded.sidecar["class_key"] == "class"
    out = tmp_path / "synthetic"
    opts = GenerateOptions(n=4, classes=["1"], sampler=SamplerSettings("ddim", 3))
    generate(str(tmp_path / "run" / "export"), str(out), opts)
    assert {r["labels"]["class"] for r in Manifest.open(str(out)).rows(decode_json=True)} == {1}


@pytest.mark.slow
def test_tiny_3d_diffusion_trains_and_samples_on_real_ct(sample_data, tmp_path):
    from medfm.pretrain.train import run

    shards = ct_shards(sample_data, tmp_path / "ct")
    objective = {
        "name": "diffusion",
        "spatial_dims": 3,
        "sample_size": [16, 16, 8],
        "channels": [8, 16],
        "attention_levels": [False, False],
    }
    base = base_config(tmp_path, shards, None, [objective], max_steps=30, lr=3e-3)
    base["data"] |= {"batch_size": 4, "intensity": "window", "window": [-1000, 1000]}
    cfg = load_config(None, base=base)
    run(cfg)
    values = losses(cfg.out_dir, "train/diffusion/loss")
    assert np.mean(values[-2:]) < np.mean(values[:2]), values
    out = tmp_path / "synthetic"
    export = tmp_path / "run" / "export"
    generate(str(export), str(out), GenerateOptions(n=2, sampler=SamplerSettings("ddim", 4)))
    assert verify(str(out)).ok
    shards_set = ShardSet(str(out))
    row = next(shards_set.rows())
    s = shards_set.read_sample(row)
    real_row = next(Manifest.open(str(shards)).rows())
    assert s.kind == "volume3d" and s.data.shape == (16, 16, 8) and s.data.dtype == np.int16
    assert s.geometry.spacing == pytest.approx(tuple(real_row["spacing"]))
    assert -1000 <= s.data.min() and s.data.max() <= 1000
    assert json.loads(row["provenance"])["generator_sha256"] == row["generator"]
    from medfm.synth.audit import audit, load_audit_config

    cfg = load_audit_config(overrides={"patches_per_volume": 24, "msssim_pairs": 10})
    report = audit(str(out), str(shards), str(tmp_path / "audit"), cfg)
    assert report["counts"] == {"synthetic": 2, "real_train": 24, "real_heldout": 24}
    assert "held-out volumes" in report["warnings"][0]
    assert (tmp_path / "audit" / "closest_pairs.png").exists()
