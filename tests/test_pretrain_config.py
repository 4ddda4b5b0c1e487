"""Configs, registries and bad input: errors name the key or the mismatch, before data is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from pretrain_helpers import DECODER, TINY, base_config, pneumonia_shards, run_cli, write_yaml

from medfm.config import ConfigError
from medfm.models import ENCODERS, build_encoder
from medfm.pretrain.config import load_config
from medfm.pretrain.objectives import OBJECTIVES, Context

torch.set_num_threads(1)

ENCODER_SPECS = {
    "vit2d": ({"img_size": 32, "patch_size": 8, "in_chans": 3}, lambda: torch.rand(4, 3, 32, 32)),
    "vit3d": (
        {"img_size": [16, 16, 8], "patch_size": [8, 8, 4]},
        lambda: torch.rand(4, 1, 16, 16, 8),
    ),
    "signal_vit": (
        {"num_leads": 3, "length": 200, "patch_size": 20},
        lambda: torch.randn(4, 3, 200),
    ),
    "ehr_transformer": (
        {"vocab_size": 50, "max_tokens": 12},
        lambda: torch.randint(1, 49, (4, 12)),
    ),
    "timm": (
        {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 3},
        lambda: torch.rand(4, 3, 32, 32),
    ),
    "monai_swin3d": (
        {
            "img_size": [64, 32, 32],
            "feature_size": 12,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 2, 2, 4],
        },
        lambda: torch.rand(4, 1, 64, 32, 32),
    ),
    "monai_vit3d": (
        {
            "img_size": [16, 16, 8],
            "patch_size": [8, 8, 4],
            "hidden_size": 64,
            "mlp_dim": 128,
            "num_layers": 2,
        },
        lambda: torch.rand(4, 1, 16, 16, 8),
    ),
}
# Their tokens come out of the whole input, so there are no per-token pixels to patchify.
UNMASKABLE = {"monai_swin3d"}


def build_tiny(name: str, params: dict):
    """The encoder shrunk by the TINY fields its config has (timm's arch names its own size),
    unless `params` sets them (a Swin's num_heads are per stage)."""
    fields = {f.name for f in dataclasses.fields(ENCODERS.entry(name).config_cls)}
    return build_encoder({"name": name, **{k: v for k, v in TINY.items() if k in fields}, **params})


def test_every_registered_encoder_is_covered_and_runs():
    assert sorted(ENCODER_SPECS) == ENCODERS.names()
    for name, (params, make) in ENCODER_SPECS.items():
        enc = build_tiny(name, params)
        x = make()
        enc.check_input(x, enc.kind)
        out = enc(x)
        assert out.shape == (4, 1 + (enc.num_tokens or x.shape[1]), enc.embed_dim)
        if enc.num_tokens and name not in UNMASKABLE:  # exact inverses (MAE targets, previews)
            assert torch.equal(enc.unpatchify(enc.patchify(x)), x)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_vit2d_sizes_follow_timm(size):
    import timm

    ours = build_encoder({"name": "vit2d", "size": size, "img_size": 224, "in_chans": 3})
    ref = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, num_classes=0)
    count = sum(p.numel() for p in ours.parameters())
    # Ours has no position for the class token (so positions can be gathered by mask).
    assert count + ours.embed_dim == sum(p.numel() for p in ref.parameters())
    assert ours.embed_dim == ref.embed_dim


def test_every_objective_gives_a_finite_loss_on_every_kind_it_claims():
    """Sweep of the objective registry against compatible encoders (the generative ones
    excluded: diffusion, the autoencoder and latent diffusion own their model, sized by their
    own config, and have their own tests: test_diffusion.py, test_latent_diffusion.py)."""
    swept = set()
    for obj_name in OBJECTIVES.names():
        if obj_name.startswith(("ddpm", "diffusion", "autoencoder", "latent")):
            continue
        for enc_name, (params, make) in ENCODER_SPECS.items():
            enc = build_tiny(enc_name, params)
            pair = build_tiny(enc_name, params)
            ctx = Context(enc, pair, seed=3)
            spec = dict(DECODER) if obj_name == "mae" else {}
            try:
                obj = OBJECTIVES.build(obj_name, spec, ctx)
            except (AttributeError, ConfigError):
                continue
            if enc.kind not in obj.kinds:
                continue
            x = make()
            batch = {"data": x, "pair": {"data": make()}}
            if x.dtype == torch.int64:
                batch["pad_mask"] = x == 0
                batch["pair"]["pad_mask"] = batch["pair"]["data"] == 0
            out = obj.loss(batch)
            assert torch.isfinite(out["loss"]), (obj_name, enc_name)
            out["loss"].backward()
            swept.add((obj_name, enc.kind))
    assert {("mae", "image2d"), ("mae", "volume3d"), ("mae", "signal"), ("mcm", "ehr")} <= swept
    assert {("simclr", k) for k in ("image2d", "volume3d", "signal", "ehr")} <= swept
    assert {("clip", k) for k in ("image2d", "signal", "ehr")} <= swept


def _tree(tmp_path: Path) -> dict:
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    return base_config(tmp_path, tmp_path / "absent-shards", model, [{"name": "mae"}])


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=0.1"], "train.lrr: unknown key"),
        (["train.lr=fast"], "train.lr: expected float"),
        (["data.batch_size=1.5"], "data.batch_size: expected int"),
        (["model.patchsize=4"], "model.patchsize: unknown key"),
        (["objectives.0.mask_ration=0.5"], "objectives[0].mask_ration: unknown key"),
        (["objectives.0.name=maee"], "unknown objective 'maee'"),
        (["model.name=vit4d"], "unknown encoder 'vit4d'"),
        (["train.strategy=horovod"], "train.strategy: expected one of"),
        (["train.max_steps=0"], "train.max_steps: must be >= 1"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, override, base=_tree(tmp_path))


def test_cli_rejects_bad_config_before_reading_data(tmp_path):
    """The shard path does not exist; the error must be about the key, not the data."""
    cfg = write_yaml(_tree(tmp_path), tmp_path / "cfg.yaml")
    res = run_cli(["--config", str(cfg), "train.warmup_stepz=3"])
    assert res.returncode == 2
    assert "train.warmup_stepz: unknown key" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # --list imports every objective plugin (diffusers)
def test_cli_lists_registries():
    res = run_cli(["--list"])
    assert res.returncode == 0, res.stderr
    assert "vit3d" in res.stdout and "clip" in res.stdout and "mae2d_tiny.yaml" in res.stdout


def test_packaged_example_configs_validate():
    from medfm.pretrain.cli import EXAMPLES

    ours = ["mae2d_tiny", "mae3d_tiny", "mae1d_ecg_tiny", "hybrid2d_tiny", "clip_ehr_tiny"]
    for name in ours:
        load_config(EXAMPLES / f"{name}.yaml")


def test_3d_encoder_on_2d_shards_is_refused_clearly(tmp_path, sample_data):
    from medfm.pretrain.train import build

    shards = pneumonia_shards(sample_data, tmp_path / "pm", n=32)
    model = {"name": "vit3d", "img_size": [16, 16, 8], "patch_size": [8, 8, 4], **TINY}
    cfg = load_config(None, base=base_config(tmp_path, shards, model, [{"name": "mae"}]))
    with pytest.raises(ValueError, match="reads volume3d data but the shards hold image2d"):
        build(cfg)


def test_clip_without_pair_data_is_refused(tmp_path, sample_data):
    from medfm.pretrain.train import build

    shards = pneumonia_shards(sample_data, tmp_path / "pm", n=32)
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    tree = base_config(tmp_path, shards, model, [{"name": "clip"}])
    tree["pair_model"] = dict(model)
    with pytest.raises(ValueError, match="needs paired data: set data.pair"):
        build(load_config(None, base=tree))
