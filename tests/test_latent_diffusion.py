"""Latent diffusion through the pretrain engine: a MONAI AutoencoderKL trained on real chest
X-rays (PneumoniaMNIST) and real CT patches (TotalSegmentator), a class-conditional latent UNet
with classifier-free guidance over its latents, and `medfm synth generate` from that export into
shards `medfm shards verify` accepts, with both exports' hashes in the provenance."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import assert_drops, base_config, ct_shards, losses, pneumonia_shards
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from medfm.config import ConfigError
from medfm.io import sha256_file
from medfm.models.diffusion.export import CheckpointKindError
from medfm.models.diffusion.latent import (
    build_autoencoder,
    load_autoencoder,
    load_latent_diffusion,
    sample_latent,
)
from medfm.models.diffusion.sampling import SamplerSettings
from medfm.pretrain.config import load_config
from medfm.pretrain.objectives import OBJECTIVES, Context
from medfm.pretrain.plots import preview_grid
from medfm.shards import Manifest, ShardSet, verify
from medfm.synth.generate import GenerateOptions, generate

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

AE_2D = {"channels": [16, 32], "attention_levels": [False, False], "latent_channels": 2}
AE_3D = {**AE_2D, "spatial_dims": 3, "sample_size": [16, 16, 16], "norm_num_groups": 8}
LDM = {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 8}
CT_DATA = {"batch_size": 4, "intensity": "window", "window": [-1000, 1000]}


def train(tmp: Path, shards: Path, objective: dict, data: dict | None = None, **kw) -> Path:
    """One engine run in `tmp`; returns its export folder."""
    from medfm.pretrain.train import run

    base = base_config(tmp, shards, None, [objective], lr=3e-3, **kw)
    base["data"] |= data or {}
    torch.manual_seed(0)
    run(load_config(None, base=base))
    return tmp / "run" / "export"


@pytest.fixture(scope="module")
def one_thread_module():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def world(sample_data, tmp_path_factory, one_thread_module) -> dict[str, Path]:
    """Real shard sets and the two autoencoders trained on them (one fit each, shared)."""
    root = tmp_path_factory.mktemp("ldm")
    pm = pneumonia_shards(sample_data, root / "pm", n=128)
    ct = ct_shards(sample_data, root / "ct")
    ae = {"max_steps": 40, "log_every": 1}
    ae2d = train(root / "ae2d", pm, {"name": "autoencoder_kl", **AE_2D}, **ae)
    ae3d = train(root / "ae3d", ct, {"name": "autoencoder_kl", **AE_3D}, CT_DATA, **ae)
    return {"root": root, "pm": pm, "ct": ct, "ae2d": ae2d, "ae3d": ae3d}


@pytest.fixture(scope="module")
def ldm2d(world) -> Path:
    """A 2-class latent model on the 2D autoencoder's latents (class dropout 0.2)."""
    objective = {
        "name": "latent_diffusion",
        "autoencoder": str(world["ae2d"]),
        "num_classes": 2,
        "class_dropout": 0.2,
        **LDM,
    }
    return train(world["root"] / "ldm2d", world["pm"], objective, {"class_key": "class"})


def real_batch(shards: Path, n: int) -> torch.Tensor:
    s = ShardSet(str(shards))
    rows = list(s.rows())[:n]
    return torch.stack([torch.as_tensor(s.read_sample(r).data / 255.0)[None] for r in rows])


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_autoencoder_reconstruction_improves_in_a_real_fit(world, dims):
    run = world[f"ae{dims}"].parent
    assert_drops(losses(run, "train/autoencoder_kl/reconstruction"), factor=0.7)
    ae = load_autoencoder(world[f"ae{dims}"])
    if dims == "2d":
        x, factor = real_batch(world["pm"], 32).float(), 0.5
    else:  # CT patches from air to soft tissue, windowed to [0, 1] as the engine did
        s = ShardSet(str(world["ct"]))
        vol = s.read_sample(next(s.rows())).data
        corners = [(0, 0, 0), (40, 40, 8), (53, 42, 7), (100, 80, 14), (20, 50, 10)]
        patches = [vol[i : i + 16, j : j + 16, k : k + 16] for i, j, k in corners]
        x = torch.as_tensor(np.clip((np.stack(patches) + 1000.0) / 2000.0, 0, 1))[:, None]
        x, factor = x.float(), 0.7  # 40 steps on one volume: coarser than the 2D fit
    torch.manual_seed(0)
    fresh = build_autoencoder(ae.cfg).eval()

    def error(model: torch.nn.Module) -> float:
        with torch.no_grad():
            mu, _ = model.encode(x * 2 - 1)
            return float((model.decode(mu) - (x * 2 - 1)).abs().mean())

    assert error(ae.model) < factor * error(fresh), (error(ae.model), error(fresh))
    assert ae.sidecar["preprocessing"]["kind"] == ("image2d" if dims == "2d" else "volume3d")


def check_synthetic(out: Path, export: Path, ae_export: Path) -> list[dict]:
    """The set verifies and names both exports' hashes, per sample and in the header."""
    assert verify(str(out)).ok, verify(str(out)).errors
    latent_sha = sha256_file(*_fs(next(export.glob("*_latent.safetensors"))))[0]
    ae_sha = sha256_file(*_fs(next(ae_export.glob("*_autoencoder.safetensors"))))[0]
    manifest = Manifest.open(str(out))
    info = manifest.header["attributes"]["synthetic"]
    assert (info["generator_sha256"], info["autoencoder_sha256"]) == (latent_sha, ae_sha)
    assert info["kind"] == "latent_diffusion" and info["scale_factor"] > 0
    rows = list(manifest.rows(decode_json=True))
    for r in rows:
        assert r["synthetic"] and r["generator"] == latent_sha
        assert r["provenance"]["generator_sha256"] == latent_sha
        assert r["provenance"]["autoencoder_sha256"] == ae_sha
    return rows


def _fs(path: Path):
    from medfm.io import get_fs

    return get_fs(str(path))


def test_latent_diffusion_2d_fit_and_synth_generate_cli_into_verified_shards(world, ldm2d):
    from medfm.cli import app

    values = losses(ldm2d.parent, "train/latent_diffusion/loss")
    assert np.isfinite(values).all() and np.mean(values[-5:]) < np.mean(values[:5]), values
    loaded = load_latent_diffusion(ldm2d)
    assert loaded.classes == [0, 1] and loaded.sidecar["scale_factor"] > 0
    out = world["root"] / "syn2d"
    args = ["synth", "generate", "--model", str(ldm2d), "--n", "4", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--steps", "4", "--class", "1", "--guidance-scale", "2"])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(app, ["shards", "verify", str(out)]).exit_code == 0
    rows = check_synthetic(out, ldm2d, world["ae2d"])
    assert {r["labels"]["class"] for r in rows} == {1}
    assert {r["meta"]["guidance_scale"] for r in rows} == {2.0}
    assert rows[0]["shape"] == [28, 28] and rows[0]["dtype"] == "|u1"


def test_latent_diffusion_3d_fit_and_generate_into_verified_shards(world):
    objective = {"name": "latent_diffusion", "autoencoder": str(world["ae3d"]), **LDM}
    export = train(world["root"] / "ldm3d", world["ct"], objective, CT_DATA, max_steps=20)
    values = losses(export.parent, "train/latent_diffusion/loss")
    assert np.isfinite(values).all() and np.mean(values[-3:]) < np.mean(values[:3]), values
    out = world["root"] / "syn3d"
    generate(str(export), str(out), GenerateOptions(n=2, sampler=SamplerSettings("ddim", 4)))
    check_synthetic(out, export, world["ae3d"])
    s = ShardSet(str(out))
    sample = s.read_sample(next(s.rows()))
    assert sample.kind == "volume3d" and sample.data.shape == (16, 16, 16)
    assert sample.data.dtype == np.int16 and -1000 <= sample.data.min() <= sample.data.max() <= 1000
    # An unconditional model has no guidance to set: refused by name, before any sampling.
    opts = GenerateOptions(n=1, guidance_scale=2.0, overwrite=True)
    with pytest.raises(ValueError, match="--guidance-scale needs a class-conditional"):
        generate(str(export), str(out), opts)
    assert verify(str(out)).ok  # the set is left as it was


def test_guidance_scale_and_class_change_samples(ldm2d):
    model = load_latent_diffusion(ldm2d).model
    s, seeds = SamplerSettings("ddim", 4), [3, 4]

    def draw(classes: list[int], w: float) -> torch.Tensor:
        return sample_latent(model, seeds, s, classes, w)

    guided, unguided = draw([0, 0], 3.0), draw([0, 0], 0.0)
    assert (guided - unguided).abs().max() > 1e-3  # guidance changes what is drawn
    assert (draw([1, 1], 3.0) - guided).abs().max() > 1e-3  # and the class is used
    # w = 0 is the null class alone: the requested class plays no part.
    torch.testing.assert_close(draw([1, 1], 0.0), unguided)
    torch.testing.assert_close(draw([0, 0], 3.0), guided)  # seeded: reproducible


def test_latent_objectives_build_through_the_registry_and_refuse_bad_configs(world, tmp_path):
    obj = OBJECTIVES.build(
        "latent_diffusion", {"autoencoder": str(world["ae2d"]), **LDM}, Context(None)
    )
    assert set(obj.export_modules()) == {"latent"} and obj.kinds == ("image2d", "volume3d")
    loss = obj.loss({"data": real_batch(world["pm"], 4).float()})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and obj.model.scale_factor > 0
    assert all(p.grad is None for p in obj.model.autoencoder.parameters())  # frozen
    ae = OBJECTIVES.build("autoencoder_kl", AE_3D, Context(None))
    assert set(ae.export_modules()) == {"autoencoder"}
    assert ae.contract_hints()["patch_size"] == (16, 16, 16)
    # The checkpoint PNGs: images beside samples (2D latent) and reconstructions (3D patches).
    for o, x in ((obj, real_batch(world["pm"], 2).float()), (ae, torch.rand(2, 1, 16, 16, 16))):
        preview_grid(o.preview({"data": x}), tmp_path / f"{o.name}.png", o.name)
        assert (tmp_path / f"{o.name}.png").stat().st_size > 1000
    for name, params, key in [
        ("autoencoder_kl", {"sample_size": [27, 27]}, "sample_size"),  # not divisible by 2
        ("autoencoder_kl", {"loss": "l3"}, "loss"),
        ("latent_diffusion", {}, "autoencoder"),
        (
            "latent_diffusion",
            {"autoencoder": str(world["ae2d"]), "sample_size": [27, 27]},
            "sample_size",
        ),
    ]:
        with pytest.raises(ConfigError, match=key):
            OBJECTIVES.build(name, params, Context(None))
    with pytest.raises(CheckpointKindError, match="not the export folder"):
        OBJECTIVES.build("latent_diffusion", {"autoencoder": str(tmp_path)}, Context(None))


def test_a_latent_model_whose_autoencoder_was_replaced_is_refused(world, ldm2d, tmp_path):
    ae_run = tmp_path / "ae"
    shutil.copytree(world["ae2d"].parent, ae_run)
    weights = next((ae_run / "export").glob("*_autoencoder.safetensors"))
    state = load_file(str(weights))
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights))
    ldm_run = tmp_path / "ldm"
    shutil.copytree(ldm2d.parent, ldm_run)
    cfg = json.loads((ldm_run / "config.json").read_text())
    cfg["objectives"][0]["autoencoder"] = str(ae_run / "export")
    (ldm_run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointKindError, match="autoencoder differs"):
        load_latent_diffusion(ldm_run / "export")


def test_latent_generation_as_ray_tasks_matches_local(world, ldm2d):
    """The latent file alone travels to the workers (it holds the autoencoder): the samples
    equal local ones for the same seeds, class and guidance."""
    import ray

    out, here = world["root"] / "syn2d-ray", world["root"] / "syn2d-local"
    opts = GenerateOptions(
        n=4, classes=["1"], sampler=SamplerSettings("ddim", 4), guidance_scale=2.0,
        address="auto", tasks=2, batch_size=2,
    )  # fmt: skip
    generate(str(ldm2d), str(here), dataclasses.replace(opts, address=None, batch_size=4))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        generate(str(ldm2d), str(out), opts)
    finally:
        ray.shutdown()
    rows = check_synthetic(out, ldm2d, world["ae2d"])
    assert len({r["shard"] for r in rows}) == 2
    local, remote = ShardSet(str(here)), ShardSet(str(out))
    by_seed = {json.loads(r["meta"])["seed"]: r for r in local.rows()}
    for r in remote.rows():
        a = remote.read_sample(r).data.astype(int)
        b = local.read_sample(by_seed[json.loads(r["meta"])["seed"]]).data.astype(int)
        assert np.abs(a - b).max() <= 1  # batched conv numerics: at most one grey level


def test_a_latent_model_trained_under_another_window_than_its_autoencoder_is_refused(
    ldm2d, tmp_path
):
    ldm_run = tmp_path / "ldm"
    shutil.copytree(ldm2d.parent, ldm_run)
    cfg = json.loads((ldm_run / "config.json").read_text())
    cfg["data"] |= {"intensity": "window", "window": [0, 128]}
    (ldm_run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointKindError, match="prepared unlike its autoencoder.*intensity"):
        load_latent_diffusion(ldm_run / "export")
