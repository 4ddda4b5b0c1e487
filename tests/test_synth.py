"""The synth stage on real PneumoniaMNIST chest X-rays: a tiny class-conditional DDPM trains on
CPU, generates shards that verify and load like real ones, and the audit measures fidelity and
catches planted copies of training images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synth_helpers import write_pneumonia

from medfm.models.diffusion.export import load_diffusion
from medfm.models.diffusion.sampling import SamplerSettings
from medfm.shards import Manifest, Sample, ShardSet, ShardSetWriter, verify
from medfm.synth.audit import audit, load_audit_config
from medfm.synth.generate import GenerateOptions, generate

pytestmark = pytest.mark.slow
SAMPLER = SamplerSettings("ddim", 15)


def train_diffusion(real: Path, out_dir: Path, max_steps: int) -> Path:
    """A tiny class-conditional DDPM through the pretrain engine; returns its export folder."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    objective = {
        "name": "diffusion",
        "sample_size": [28, 28],
        "channels": [8, 16, 16],
        "num_classes": 2,
        "attention_levels": [False, False, False],
    }
    cfg = {
        "name": "tiny",
        "out_dir": str(out_dir),
        "data": {"shards": str(real), "class_key": "class", "batch_size": 32, "num_workers": 0},
        "objectives": [objective],
        "train": {
            "max_steps": max_steps,
            "lr": 3e-3,
            "weight_decay": 0.0,
            "warmup_steps": 10,
            "checkpoint_every": 80,
            "log_every": 5,
            "loggers": ["csv"],
        },
    }
    run(load_config(None, base=cfg))
    return out_dir / "export"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real shards, a tiny conditional DDPM (an early and a trained export), generated shards."""
    torch.set_num_threads(1)  # oversubscribed OpenMP threads crawl on a shared 2-core box
    tmp = tmp_path_factory.mktemp("synth")
    real = tmp / "real"
    train_images = write_pneumonia(real, {"train": 600, "val": 150})
    early = train_diffusion(real, tmp / "early", max_steps=10)
    export = train_diffusion(real, tmp / "run", max_steps=160)
    synthetic = tmp / "synthetic"
    generate(str(export), str(synthetic), GenerateOptions(n=96, sampler=SAMPLER))
    return {
        "tmp": tmp,
        "real": str(real),
        "early": early,
        "export": export,
        "synthetic": str(synthetic),
        "train_images": train_images,
    }


def test_loss_drops_and_pngs_are_written(world):
    from pretrain_helpers import losses

    values = losses(world["tmp"] / "run")
    assert np.mean(values[-4:]) < 0.6 * np.mean(values[:2]), values
    plots = world["tmp"] / "run" / "plots"
    assert (plots / "loss.png").stat().st_size > 1000
    assert (plots / "diffusion_step0000160.png").stat().st_size > 1000  # sample grid


def test_frechet_distance_falls_with_training(world):
    early = world["early"]
    cfg = load_audit_config(overrides={"msssim_pairs": 100})
    out = world["tmp"] / "fd-early"
    generate(str(early), str(out), GenerateOptions(n=96, sampler=SAMPLER))
    fd = {
        "early": audit(str(out), world["real"], str(out / "audit"), cfg)["fidelity"],
        "late": audit(world["synthetic"], world["real"], str(out / "audit-late"), cfg)["fidelity"],
    }
    assert fd["late"]["frechet_distance"] < 0.7 * fd["early"]["frechet_distance"], fd
    assert fd["late"]["coverage"] >= fd["early"]["coverage"], fd


def test_generated_shards_verify_and_load_like_real_ones(world):
    from medfm.shards.dataset import ShardDataset

    syn = world["synthetic"]
    assert verify(syn).ok, verify(syn).errors
    m = Manifest.open(syn)
    rows = list(m.rows(decode_json=True))
    sidecar = load_diffusion(world["export"]).sidecar
    real_row = next(Manifest.open(world["real"]).rows())
    assert len(rows) == 96
    for r in rows:
        assert r["synthetic"] is True and r["generator"] == sidecar["weights"]["sha256"]
        assert r["meta"]["sampler"] == {"sampler": "ddim", "steps": 15, "eta": 0.0}
        assert r["labels"]["class"] in (0, 1) and r["meta"]["class"] == r["labels"]["class"]
        assert r["shape"] == real_row["shape"] and r["dtype"] == real_row["dtype"]
    assert {r["labels"]["class"] for r in rows} == {0, 1}  # classes cycle
    assert len({r["meta"]["seed"] for r in rows}) == 96
    attrs = m.header["attributes"]["synthetic"]
    assert attrs["contract"]["intensity"] == {"mode": "window", "low": 0.0, "high": 255.0}
    # The same reader as for real shards, with the same item layout.
    ds = ShardDataset(syn, shuffle=False)
    items = list(ds)
    real_item = next(iter(ShardDataset(world["real"], shuffle=False)))
    assert len(items) == 96 and items[0]["data"].shape == real_item["data"].shape
    assert items[0]["data"].dtype == real_item["data"].dtype
    assert float(items[0]["data"].float().std()) > 0.05  # an image, not a constant


def test_samples_reproduce_from_seed_alone(world):
    out = world["tmp"] / "again"
    generate(
        str(world["export"]),
        str(out),
        GenerateOptions(n=3, seed=5, classes=["1"], sampler=SAMPLER, batch_size=2),
    )
    a, b = ShardSet(str(out)), ShardSet(world["synthetic"])
    by_seed = {json.loads(r["meta"])["seed"]: r for r in b.rows()}
    for row in a.rows():
        seed = json.loads(row["meta"])["seed"]
        if json.loads(by_seed[seed]["labels"])["class"] == 1:  # same seed and class
            np.testing.assert_allclose(
                a.read_sample(row).data.astype(int),
                b.read_sample(by_seed[seed]).data.astype(int),
                atol=2,
            )


def planted_set(world, root: Path, noise_sigma: float) -> tuple[list[str], list[str]]:
    """Fresh generated samples plus an exact and a lightly-noised copy of training images."""
    src = Manifest.open(world["synthetic"])
    shards = ShardSet(world["synthetic"])
    rng = np.random.default_rng(0)
    train = world["train_images"]
    with ShardSetWriter(str(root)) as w:
        fresh = []
        for row in src.rows():
            s = shards.read_sample(row)
            w.write(s)
            fresh.append(s.key)
        copies = {
            "planted-exact": train[17],
            "planted-noisy": np.clip(
                train[123] + rng.normal(0, noise_sigma, train[123].shape), 0, 255
            ).astype(np.uint8),
        }
        for key, img in copies.items():
            w.write(
                Sample(
                    key=key,
                    kind="image2d",
                    modality="CR",
                    dataset="pneumoniamnist-synthetic",
                    patient_id=f"synthetic-{key}",
                    split="train",
                    data=img,
                    labels={"class": 0},
                    synthetic=True,
                    generator="planted",
                )
            )
        w.close(attributes=src.header["attributes"])
    return fresh, list(copies)


def test_memorization_audit_flags_planted_copies_and_passes_fresh_samples(world):
    root = world["tmp"] / "planted"
    fresh, planted = planted_set(world, root, noise_sigma=4.0)
    report = audit(str(root), world["real"], str(root / "audit"), load_audit_config())
    mem = report["memorization"]
    assert set(planted) <= set(mem["flagged_keys"]), mem
    fresh_flagged = set(mem["flagged_keys"]) - set(planted)
    assert len(fresh_flagged) <= 0.05 * len(fresh), mem
    assert mem["calibration"]["heldout"] == 150
    for name in ("report.json", "report.png", "closest_pairs.png"):
        assert (root / "audit" / name).stat().st_size > 500
    saved = json.loads((root / "audit" / "report.json").read_text())
    assert saved["verdict"] in ("pass", "fail") and saved["checks"]
    fd = {c["name"]: c for c in saved["checks"]}
    assert fd["flagged_fraction"]["value"] == pytest.approx(mem["flagged_fraction"])


def test_fresh_samples_alone_pass_the_memorization_check(world):
    report = audit(world["synthetic"], world["real"], str(world["tmp"] / "a1"), load_audit_config())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["flagged_fraction"]["pass"], report["memorization"]
    assert report["diversity"]["msssim_synthetic"] < 0.9  # not one image repeated


def test_generate_with_audit_withholds_flagged_samples(world):
    out = world["tmp"] / "audited"
    from medfm.synth.withhold import generate_audited

    # A lenient calibration (half of new real images would be flagged) forces withholding.
    cfg = load_audit_config(overrides={"calibration_quantile": 0.5, "msssim_pairs": 50})
    export = str(world["export"])
    header, report = generate_audited(
        export, str(out), GenerateOptions(n=40, sampler=SAMPLER), None, cfg
    )
    withheld = report["memorization"]["flagged_keys"]
    assert 0 < len(withheld) < 40
    assert header["num_samples"] == 40 - len(withheld)
    assert verify(str(out)).ok
    keys = {r["key"] for r in Manifest.open(str(out)).rows()}
    assert not keys & set(withheld)
    record = Manifest.open(str(out)).header["attributes"]["synthetic"]["audit"]
    assert record["withheld"] == len(withheld)
    assert {w["key"] for w in record["withheld_samples"]} == set(withheld)
    tar_bytes = b"".join(p.read_bytes() for p in (out / "tars").glob("*.tar"))
    assert all(k.encode() not in tar_bytes for k in withheld)  # not merely unlisted
    assert not [p for p in out.iterdir() if "staging" in p.name]


def test_generation_as_ray_tasks(world):
    import ray

    out = world["tmp"] / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        generate(
            str(world["export"]),
            str(out),
            GenerateOptions(
                n=12, sampler=SamplerSettings("dpm", 8), address="auto", tasks=2, batch_size=4
            ),
        )
    finally:
        ray.shutdown()
    assert verify(str(out)).ok
    m = Manifest.open(str(out))
    assert len(m) == 12 and len({r["shard"] for r in m.rows()}) == 2
    assert json.loads(next(m.rows())["meta"])["sampler"]["sampler"] == "dpm"


def test_synthetic_mix_realizes_the_ratio(world):
    from torch.utils.data import DataLoader

    from medfm.finetune.data import with_synthetic
    from medfm.shards.dataset import ShardDataset
    from medfm.shards.mixing import RealizedRatio

    real = ShardDataset(world["real"], split="train", seed=3)
    mixed = with_synthetic(real, ShardDataset(world["synthetic"], synthetic=True), 0.3, seed=3)
    meter = RealizedRatio(0.3)
    for batch in DataLoader(
        mixed, batch_size=50, collate_fn=lambda items: [i["meta"]["synthetic"] for i in items]
    ):
        meter.update(batch)
    assert meter.total == round(600 / 0.7)
    assert meter.within_tolerance(), (meter.ratio, meter.tolerance())
    assert meter.record()["realized"] == pytest.approx(meter.ratio)
    flags = RealizedRatio(0.5)
    flags.update(torch.tensor([True, False, False, False]))
    assert flags.ratio == 0.25 and not flags.within_tolerance(z=0.5)
