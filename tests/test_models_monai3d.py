"""MONAI's Swin (SwinUNETR's swinViT) and ViT as registry encoders: MONAI's published
checkpoint layouts load into them with a report of what did not, and they pretrain on real CT
patches. No network: the checkpoints are MONAI models' own weights, saved as MONAI publishes
them."""

from __future__ import annotations

import pickle

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR
from pretrain_helpers import DECODER, base_config, ct_shards, losses
from safetensors.torch import load_file, save_file

from medfm.config import ConfigError
from medfm.models import build_encoder
from medfm.pretrain.config import load_config
from medfm.pretrain.objectives import OBJECTIVES, Context
from medfm.pretrain.train import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWIN = {"name": "monai_swin3d", "img_size": [32, 32, 32], "feature_size": 12,
        "depths": [1, 1, 1, 1]}  # fmt: skip
VIT = {"name": "monai_vit3d", "img_size": [32, 32, 32], "patch_size": [16, 16, 16],
       "hidden_size": 48, "mlp_dim": 96, "num_layers": 12, "num_heads": 4}  # fmt: skip
# What the SSL tutorial's checkpoint holds besides the Swin: its pretext heads and decoder.
SSL_HEADS = ("rotation_head.weight", "contrastive_head.weight", "conv.0.weight")


def published_swin_ssl(swin_vit: torch.nn.Module) -> dict:
    """A swinViT's weights as MONAI's model_swinvit.pt holds them (the layout that
    SwinUNETR.load_from reads): `state_dict`, DataParallel's `module.`, `mlp.fc1/fc2`."""
    state = {
        "module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
        for k, v in swin_vit.state_dict().items()
    }
    state |= {f"module.{k}": torch.randn(4, 4) for k in SSL_HEADS}
    return {"state_dict": state}


@pytest.fixture(scope="module")
def monai_swin():
    torch.manual_seed(7)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))


def assert_same_weights(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_swin_starts_from_monais_published_ssl_layout(tmp_path, monai_swin, fmt):
    published = published_swin_ssl(monai_swin.swinViT)
    if fmt == "torch":
        path = tmp_path / "model_swinvit.pt"
        torch.save(published, path)
    else:
        path = tmp_path / "model_swinvit.safetensors"
        save_file(published["state_dict"], str(path))
    enc = build_encoder({**SWIN, "pretrained": str(path)})
    assert_same_weights(dict(enc.swinViT.state_dict()), dict(monai_swin.swinViT.state_dict()))
    assert enc.load_report["missing"] == []
    assert enc.load_report["unexpected"] == sorted(f"module.{k}" for k in SSL_HEADS)
    # MONAI's own loader of that file puts the same weights into a fresh SwinUNETR.
    fresh = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
    fresh.load_from(published)
    assert_same_weights(dict(enc.swinViT.state_dict()), dict(fresh.swinViT.state_dict()))
    # Its tokens are SwinUNETR's bottleneck features; token 0 is their mean.
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = enc.eval()(x)
        ref = monai_swin.eval().swinViT(x, normalize=True)[-1].flatten(2).transpose(1, 2)
    assert out.shape == (2, 1 + enc.num_tokens, 16 * 12) == (2, 2, 192)
    torch.testing.assert_close(out[:, 1:], ref)
    torch.testing.assert_close(out[:, 0], ref.mean(1))
    assert enc.describe()["params"]["pretrained"] is None  # exports carry their own weights


def test_vit_loads_a_unetr_checkpoint_and_its_own_safetensors(tmp_path):
    torch.manual_seed(3)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48,
                  mlp_dim=96, num_heads=4)  # fmt: skip
    path = tmp_path / "unetr.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in unetr.state_dict().items()}}, path)
    enc = build_encoder({**VIT, "pretrained": str(path)})
    vit = {k: v for k, v in enc.state_dict().items() if k != "cls_token"}
    assert_same_weights(vit, dict(unetr.vit.state_dict()))
    assert enc.load_report["missing"] == ["cls_token"]  # ours: UNETR's ViT has none
    assert enc.load_report["unexpected"]
    assert all(not k.startswith("module.vit.") for k in enc.load_report["unexpected"])
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ref, _ = unetr.vit(x)
        torch.testing.assert_close(enc.tokenize(x), unetr.vit.patch_embedding(x))
    assert ref.shape[1] == enc.num_tokens == 8
    # the encoder's own state dict, as safetensors, round-trips exactly
    own = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(own))
    again = build_encoder({**VIT, "pretrained": str(own)})
    assert again.load_report == {"missing": [], "unexpected": [], "adapted": []}
    assert_same_weights(dict(again.state_dict()), load_file(str(own)))


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, monai_swin):
    wider = SwinUNETR(in_channels=1, out_channels=2, feature_size=24, depths=(1, 1, 1, 1))
    path = tmp_path / "wide.pt"
    torch.save(published_swin_ssl(wider.swinViT), path)
    with pytest.raises(ConfigError, match=r"wide\.pt does not fit monai_swin3d.*patch_embed"):
        build_encoder({**SWIN, "pretrained": str(path)})
    pickled = tmp_path / "pickled.pt"  # an object, not tensors: weights_only refuses it
    pickled.write_bytes(pickle.dumps({"state_dict": {"w": torch.nn.Linear(2, 2)}}))
    with pytest.raises(ConfigError, match=r"pickled\.pt is not a readable checkpoint"):
        build_encoder({**SWIN, "pretrained": str(pickled)})
    other = tmp_path / "other.safetensors"
    save_file({"head.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ConfigError, match=r"other\.safetensors has no monai_swin3d weights"):
        build_encoder({**SWIN, "pretrained": str(other)})
    with pytest.raises(ConfigError, match=r"img_size \[32, 32, 20\] is not a multiple"):
        build_encoder({**SWIN, "img_size": [32, 32, 20]})


def test_mae_refuses_the_swin_and_masks_the_vit():
    swin = build_encoder(SWIN)
    with pytest.raises(ConfigError, match="monai_swin3d tokens .* cannot be masked"):
        OBJECTIVES.build("mae", dict(DECODER), Context(swin, None))
    vit = build_encoder(VIT)
    mae = OBJECTIVES.build("mae", dict(DECODER), Context(vit, None))
    out = mae.loss({"data": torch.rand(2, 1, 32, 32, 32)})
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, objective",
    [(SWIN, {"name": "simclr"}), (VIT, {"name": "mae", "mask_ratio": 0.5, **DECODER})],
    ids=["swin-simclr", "vit-mae"],
)
def test_pretrain_steps_on_ct_patches_from_monai_weights(tmp_path, sample_data, monai_swin,
                                                         model, objective):  # fmt: skip
    """A few real steps on 32^3 TotalSegmentator CT patches, started from MONAI weights."""
    shards = ct_shards(sample_data, tmp_path / "ct")
    start = build_encoder(model)  # random MONAI weights in MONAI's layout stand in for SSL ones
    ckpt = tmp_path / "start.pt"
    if model is SWIN:
        torch.save(published_swin_ssl(start.swinViT), ckpt)
    else:
        torch.save({"state_dict": {f"module.vit.{k}": v for k, v in start.state_dict().items()}},
                   ckpt)  # fmt: skip
    tree = base_config(tmp_path, shards, {**model, "pretrained": str(ckpt)}, [objective],
                       max_steps=4, log_every=1, lr=1e-4, warmup_steps=1)  # fmt: skip
    tree["data"].update(batch_size=4, patches_per_volume=8)
    summary = run(load_config(None, base=tree))
    assert summary["steps"] == 4
    seen = losses(tree["out_dir"])
    assert len(seen) == 4 and all(torch.isfinite(torch.tensor(seen)))
    exported = load_file(tmp_path / "run" / "export" / "encoder.safetensors")
    moved = [k for k, v in start.state_dict().items() if not torch.equal(exported[k], v)]
    assert moved, "no weight trained"
    # 4 small steps from the checkpoint stay near it: the run started from it, not from scratch
    for k, v in start.state_dict().items():
        if v.is_floating_point() and v.numel() > 1:
            assert (exported[k] - v).abs().max() < 1e-2, k
