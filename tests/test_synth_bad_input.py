"""Bad input to `medfm synth`: wrong checkpoints, unknown classes, incompatible contracts, empty
sets. Each fails with a clear message naming the file and the cause."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from synth_helpers import write_pneumonia
from typer.testing import CliRunner

from medfm.models.diffusion.contract import build_contract
from medfm.models.diffusion.export import CheckpointKindError, export_diffusion, load_diffusion
from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
from medfm.models.diffusion.sampling import SamplerSettings
from medfm.shards import Manifest, write_manifest
from medfm.synth.audit import EmptyAuditError, audit
from medfm.synth.cli import app
from medfm.synth.contract import ContractMismatchError
from medfm.synth.generate import GenerateOptions, UnknownClassError, generate

FAST = SamplerSettings("ddim", 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Real shards (28 px and resized 32 px), an untrained conditional export, a synthetic set."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("bad")
    real = tmp / "real"
    write_pneumonia(real, {"train": 60, "val": 20})
    m = Manifest.open(str(real))
    rows = [r for r in m.rows() if r["split"] == "train"]
    cfg = DiffusionConfig(channels=(8, 16, 16), attention_levels=(False,) * 3, num_classes=2)
    export = export_diffusion(
        DiffusionModel(cfg).eval(),
        tmp / "model",
        preprocessing=build_contract(str(real), rows, m.header, (28, 28), None),
        classes=[0, 1],
        class_key="class",
        data_manifests=[{"root": str(real), "sha256": m.header["manifest"]["sha256"]}],
    )
    synthetic = tmp / "synthetic"
    generate(str(export), str(synthetic), GenerateOptions(n=12, sampler=FAST))
    return {"tmp": tmp, "real": str(real), "export": export, "synthetic": str(synthetic)}


def test_unknown_class_is_refused_listing_the_known_ones(setup):
    with pytest.raises(UnknownClassError, match=r"unknown class \['7'\].*\['0', '1'\]"):
        generate(
            str(setup["export"]),
            str(setup["tmp"] / "x"),
            GenerateOptions(n=2, classes=["7"], sampler=FAST),
        )
    assert not (setup["tmp"] / "x" / "manifest.json").exists()


def test_cli_reports_unknown_class_with_exit_code_2(setup):
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(setup["export"]),
            "--n",
            "2",
            "--class",
            "pneumonia",
            "--out",
            str(setup["tmp"] / "y"),
        ],
    )
    assert res.exit_code == 2
    assert "unknown class ['pneumonia']" in res.output


def test_pickle_checkpoints_are_never_loaded(setup):
    ckpt = setup["tmp"] / "last.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointKindError, match="pickles and are never loaded"):
        load_diffusion(ckpt)


def test_encoder_checkpoint_is_the_wrong_kind(setup):
    from medfm.models import ENCODERS
    from medfm.models.export import export_encoder

    enc = ENCODERS.build(
        "vit2d",
        {
            "size": "tiny",
            "img_size": 28,
            "patch_size": 7,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
        },
    )
    path = export_encoder(enc, setup["tmp"] / "enc", preprocessing={}, data={}, training={})
    with pytest.raises(CheckpointKindError, match="encoder checkpoint .*'vit2d'.*not a diffusion"):
        load_diffusion(path)
    res = CliRunner().invoke(
        app, ["generate", "--model", str(path), "--n", "1", "--out", str(setup["tmp"] / "z")]
    )
    assert res.exit_code == 2 and "not a diffusion model" in res.output


def test_tampered_weights_are_refused(setup):
    folder = setup["tmp"] / "tampered"
    shutil.copytree(setup["export"].parent, folder)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointKindError, match="sha256 differs"):
        load_diffusion(folder)


def test_audit_refuses_real_shards_with_another_contract(setup):
    resized = setup["tmp"] / "real32"
    write_pneumonia(resized, {"train": 30, "val": 10}, resize=32)
    with pytest.raises(
        ContractMismatchError, match=r"shape: synthetic \[28, 28\] vs real \[32, 32\]"
    ):
        audit(setup["synthetic"], str(resized), str(setup["tmp"] / "a"))


def test_audit_refuses_a_set_that_is_not_synthetic(setup):
    with pytest.raises(ContractMismatchError, match="not a synthetic shard set"):
        audit(setup["real"], setup["real"], str(setup["tmp"] / "b"))


def test_audit_over_an_empty_set(setup):
    empty = setup["tmp"] / "empty"
    attrs = Manifest.open(setup["synthetic"]).header["attributes"]
    write_manifest(str(empty), [], [], attributes=attrs)
    with pytest.raises(EmptyAuditError, match="holds no samples; nothing to audit"):
        audit(str(empty), setup["real"], str(setup["tmp"] / "c"))
    res = CliRunner().invoke(app, ["audit", "--synthetic", str(empty), "--real", setup["real"]])
    assert res.exit_code == 2 and "nothing to audit" in res.output


def test_generate_refuses_to_overwrite_without_the_flag(setup):
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(str(setup["export"]), setup["synthetic"], GenerateOptions(n=1, sampler=FAST))
    assert len(Manifest.open(setup["synthetic"])) == 12


def test_generated_rows_record_class_seed_and_sampler(setup):
    rows = list(Manifest.open(setup["synthetic"]).rows(decode_json=True))
    sidecar = json.loads(setup["export"].with_suffix(".json").read_text())
    assert [r["labels"]["class"] for r in rows[:4]] == [0, 1, 0, 1]
    assert all(r["generator"] == sidecar["weights"]["sha256"] for r in rows)
    assert sorted(r["meta"]["seed"] for r in rows) == list(range(12))
    assert np.all([r["provenance"]["sampler"]["steps"] == 2 for r in rows])


def test_audit_in_the_feature_space_of_our_pretrained_encoder(setup):
    from medfm.models import ENCODERS
    from medfm.models.export import export_encoder

    enc = ENCODERS.build(
        "vit2d",
        {
            "size": "tiny",
            "img_size": 28,
            "patch_size": 7,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
        },
    )
    path = export_encoder(enc, setup["tmp"] / "enc2", preprocessing={}, data={}, training={})
    from medfm.synth.audit import load_audit_config

    cfg = load_audit_config(overrides={"encoder": str(path), "msssim_pairs": 20})
    report = audit(setup["synthetic"], setup["real"], str(setup["tmp"] / "enc-audit"), cfg)
    assert report["fidelity"]["feature_space"].startswith("medfm-encoder:vit2d@")
    assert report["fidelity"]["frechet_distance"] > 0


def test_cli_generate_then_audit_exits_1_on_a_failing_verdict(setup):
    out = setup["tmp"] / "cli-out"
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(setup["export"].parent),
            "--n",
            "12",
            "--steps",
            "2",
            "--sampler",
            "dpm",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "12 synthetic samples written" in res.output
    # An untrained model draws noise: no sample lands near real data, so the verdict fails.
    res = CliRunner().invoke(app, ["audit", "--synthetic", str(out), "--real", setup["real"]])
    assert res.exit_code == 1, res.output
    assert "FAIL precision" in res.output and "verdict: fail" in res.output
    report = json.loads((out / "audit" / "report.json").read_text())
    assert report["verdict"] == "fail" and report["counts"]["synthetic"] == 12
