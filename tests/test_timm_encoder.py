"""`model: {name: timm, arch: ..., pretrained: ...}`: timm models as the 2D encoder, initialised
from a timm model's own saved state dict (no network): class-token position slots, position
grids interpolated to a new image size, RGB stems adapted to one channel, and a report of the
missing and unexpected keys."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
import timm
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import save_file

from medfm.config import ConfigError
from medfm.models import build_encoder
from medfm.models.export import export_encoder, load_encoder
from medfm.pretrain.objectives import OBJECTIVES, Context

torch.set_num_threads(1)
VIT = {"arch": "vit_tiny_patch16_224", "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}


def real_images(size: int, chans: int) -> torch.Tensor:
    """pydicom's CT and MR test slices, min-max scaled, resized to size x size, `chans` copies."""
    out = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        img = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float32)
        img = (img - img.min()) / (img.max() - img.min())
        t = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(size, size))
        out.append(t.expand(1, chans, size, size))
    return torch.cat(out)


def timm_vit(img_size: int, in_chans: int = 3, **kw) -> torch.nn.Module:
    """A stock timm ViT (class-token position slot, a 5-class head), as a checkpoint comes."""
    torch.manual_seed(0)
    sizes = {k: VIT[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")} | kw
    model = timm.create_model(
        VIT["arch"], img_size=img_size, in_chans=in_chans, num_classes=5, **sizes
    )
    return model.eval()


def save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@torch.no_grad()
def test_vit_checkpoint_loads_with_its_class_slot_folded_and_gives_timms_features(tmp_path):
    ref = timm_vit(32)
    enc = build_encoder(
        {
            "name": "timm",
            **VIT,
            "img_size": 32,
            "in_chans": 3,
            "pretrained": save(ref, tmp_path / "v.safetensors"),
        }
    ).eval()
    x = real_images(32, 3)
    # Same numbers as timm's own forward: the class slot now lives in cls_token.
    torch.testing.assert_close(enc(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    assert enc.load_report["missing"] == []
    assert enc.load_report["unexpected"] == ["head.bias", "head.weight"]
    assert any("class-token position slot" in n for n in enc.load_report["adapted"])


@torch.no_grad()
def test_position_grid_is_interpolated_and_rgb_stem_adapted_to_one_channel(tmp_path, caplog):
    ref = timm_vit(32)  # a 4x4 grid of 8-pixel patches, RGB
    path = save(ref, tmp_path / "v.safetensors")
    with caplog.at_level(logging.INFO, logger="medfm.models.timm2d"):
        enc = build_encoder(
            {"name": "timm", **VIT, "img_size": 48, "in_chans": 1, "pretrained": path}
        )
    assert enc.token_grid() == (6, 6)
    expected = timm.layers.resample_abs_pos_embed(ref.pos_embed[:, 1:], [6, 6], [4, 4], 0)
    torch.testing.assert_close(enc.pos_embed, expected)
    stem = ref.patch_embed.proj.weight
    torch.testing.assert_close(enc.patch_embed.proj.weight, stem.sum(dim=1, keepdim=True))
    notes = " ".join(enc.load_report["adapted"])
    assert "4x4 grid to 6x6" in notes and "3 input channels adapted to 1" in notes
    assert "head.weight" in caplog.text and "v.safetensors" in caplog.text
    out = enc(real_images(48, 1))
    assert out.shape == (2, 1 + 36, 64) and torch.isfinite(out).all()


@torch.no_grad()
def test_cnn_checkpoint_tokens_are_its_feature_map_and_missing_keys_are_reported(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("convnext_atto", num_classes=3, in_chans=1).eval()
    state = ref.state_dict()
    del state["stages.3.blocks.1.gamma"]  # a checkpoint that lacks one parameter
    torch.save(state, tmp_path / "convnext.pth")  # a plain torch checkpoint, loaded weights_only
    enc = build_encoder(
        {
            "name": "timm",
            "arch": "convnext_atto",
            "img_size": 64,
            "pretrained": str(tmp_path / "convnext.pth"),
        }
    ).eval()
    assert enc.load_report["missing"] == ["stages.3.blocks.1.gamma"]
    assert enc.load_report["unexpected"] == ["head.fc.bias", "head.fc.weight"]
    x = real_images(64, 1)
    ref.stages[3].blocks[1].gamma.copy_(enc.backbone.stages[3].blocks[1].gamma)  # left at init
    features = ref.forward_features(x).permute(0, 2, 3, 1).flatten(1, 2)
    out = enc(x)
    torch.testing.assert_close(out[:, 1:], features)
    torch.testing.assert_close(out[:, 0], features.mean(dim=1))  # token 0: the pooled map
    assert enc.token_grid() == (2, 2) and enc.embed_dim == ref.num_features


def test_mae_refuses_a_cnn_arch_and_trains_a_vit_arch():
    cnn = build_encoder({"name": "timm", "arch": "resnet18", "img_size": 64})
    with pytest.raises(ValueError, match="'resnet18' is not a ViT.*contrastive"):
        OBJECTIVES.build("mae", {}, Context(cnn, cnn))
    simclr = OBJECTIVES.build("simclr", {}, Context(cnn, cnn, seed=0))
    assert torch.isfinite(simclr.loss({"data": real_images(64, 1)})["loss"])
    vit = build_encoder({"name": "timm", **VIT, "img_size": 32})
    x = real_images(32, 1)
    assert torch.equal(vit.unpatchify(vit.patchify(x)), x)
    mae = OBJECTIVES.build(
        "mae", {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}, Context(vit, vit)
    )
    assert torch.isfinite(mae.loss({"data": x})["loss"])


def test_hf_hub_reference_loads_from_the_offline_cache(tmp_path, monkeypatch):
    from hub_helpers import hf_cache

    path = save(timm_vit(32), tmp_path / "model.safetensors")
    cache = tmp_path / "hf"
    hf_cache(
        cache,
        "medfm-test/vit",
        {"model.safetensors": open(path, "rb").read()},
        {"model.safetensors"},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = build_encoder(
        {
            "name": "timm",
            **VIT,
            "img_size": 32,
            "in_chans": 3,
            "pretrained": "hf-hub:medfm-test/vit",
        }
    )
    assert enc.load_report["unexpected"] == ["head.bias", "head.weight"]
    with pytest.raises(ConfigError, match="hf-hub:medfm-test/absent: cannot get model.safetensors"):
        build_encoder({"name": "timm", **VIT, "pretrained": "hf-hub:medfm-test/absent"})


def test_an_export_rebuilds_without_the_original_checkpoint(tmp_path):
    path = save(timm_vit(32), tmp_path / "v.safetensors")
    enc = build_encoder({"name": "timm", **VIT, "img_size": 32, "in_chans": 3, "pretrained": path})
    assert enc.describe()["params"]["pretrained"] is None
    sidecar = export_encoder(enc, tmp_path / "export", preprocessing={}, data={}, training={})
    (tmp_path / "v.safetensors").unlink()
    back, _ = load_encoder(sidecar)
    x = real_images(32, 3)
    torch.testing.assert_close(back.eval()(x), enc.eval()(x))


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            {"arch": "convnxt_tiny"},
            "timm has no model 'convnxt_tiny'; did you mean.*'convnext_tiny'",
        ),
        ({"arch": "resnet18", "options": {"in_chans": 3}}, "model.options.in_chans: set by the"),
        ({"arch": "resnet18", "options": {"no_such": 1}}, "create_model\\('resnet18'\\) refused"),
        ({"arch": "resnet18", "depth": 2}, "model.depth: sizes apply to ViT archs only"),
        (
            {"arch": "vit_small_patch16_224", "pretrained": "ABSENT"},
            "no such checkpoint 'absent.safetensors'",
        ),
        ({"arch": "vit_small_patch16_224", "pretrained": "EMPTY"}, "holds none of"),
        (
            {"arch": "vit_small_patch16_224", "pretrained": "JUNK"},
            "junk.pth is not a readable checkpoint",
        ),
        (
            {**VIT, "embed_dim": 32, "pretrained": "VIT"},
            r"vit.safetensors does not fit .*qkv.bias \(192,\) \(model \(96,\)\).* and \d+ more",
        ),
    ],
)
def test_bad_specs_and_checkpoints_fail_naming_the_key_and_file(tmp_path, spec, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    files = {
        "ABSENT": tmp_path / "absent.safetensors",
        "EMPTY": tmp_path / "empty",
        "JUNK": tmp_path / "junk.pth",
        "VIT": tmp_path / "vit.safetensors",  # embed_dim 64, into a model of 32
    }
    save(timm_vit(32, in_chans=1), files["VIT"])
    spec = {"img_size": 32, **spec}
    if spec.get("pretrained") in files:
        spec["pretrained"] = str(files[spec["pretrained"]])
    with pytest.raises(ConfigError, match=match):
        build_encoder({"name": "timm", **spec})


@pytest.mark.parametrize(
    ("size", "recipe", "mlp"),
    [("huge", "vit_huge_patch14_224", 5120), ("giant", "vit_giant_patch14_224", 6144)],
)
def test_vit2d_huge_and_giant_are_timms_vit_h_and_vit_g(size, recipe, mlp):
    """`size: huge | giant` builds timm's ViT-H/14 and ViT-g/14 (MLP ratio 48/11), parameter for
    parameter; on the meta device, so no 1B-parameter model is allocated."""
    with torch.device("meta"):
        ours = build_encoder({"name": "vit2d", "size": size, "patch_size": 14, "in_chans": 3})
        ref = timm.create_model(recipe, num_classes=0, no_embed_class=True)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert ours.blocks[0].mlp.fc1.out_features == mlp and len(ours.blocks) == len(ref.blocks)
    print(f"\nvit2d size {size}: {count / 1e6:.0f}M parameters")
