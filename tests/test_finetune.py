"""Fine-tuning on real data: PneumoniaMNIST (2D classification) and a TotalSegmentator CT (3D
segmentation), through every mode, export, PEFT loading and the bad-input cases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from medfm.config import ConfigError
from medfm.finetune import hub
from medfm.finetune.config import load_config
from medfm.finetune.data import Collate, loader, split_dataset, split_rows, with_synthetic
from medfm.finetune.encoder import load_base_encoder
from medfm.finetune.export import BaseEncoderMismatchError, export, load
from medfm.finetune.fit import predict
from medfm.finetune.tasks import LabelError, task_for
from medfm.finetune.train import run
from medfm.models import build_encoder
from medfm.models.contract import Contract
from medfm.models.export import export_encoder
from medfm.shards import Geometry, Sample, ShardSetWriter

torch.set_num_threads(1)
SAMPLE = os.environ.get("MEDFM_SAMPLE_DATA", "")
PNEUMONIA = Path(SAMPLE) / "pneumoniamnist" / "pneumoniamnist.npz"
CT = Path(SAMPLE) / "totalsegmentator" / "example_ct_sm.nii.gz"
needs_pneumonia = pytest.mark.skipif(
    not SAMPLE or not PNEUMONIA.is_file(), reason="MEDFM_SAMPLE_DATA/pneumoniamnist not available"
)
needs_ct = pytest.mark.skipif(
    not SAMPLE or not CT.is_file(), reason="MEDFM_SAMPLE_DATA/totalsegmentator not available"
)
ENC2D = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
         "img_size": 28, "patch_size": 7}  # fmt: skip
SIZES = {"train": 240, "val": 120, "test": 200}


def write_encoder(folder: Path, spec: dict, contract: Contract, seed: int = 0) -> Path:
    """An untrained encoder written as `medfm pretrain` exports it (safetensors + sidecar)."""
    torch.manual_seed(seed)
    export_encoder(build_encoder(spec), folder, preprocessing=contract.describe(), data={},
                   training={"steps": 0})  # fmt: skip
    return folder


def pretrain_encoder(shards: Path, out: Path) -> Path:
    """A tiny MAE pretrained for real (150 CPU steps) by `medfm pretrain` on the train split."""
    from medfm.pretrain.config import load_config as pretrain_config
    from medfm.pretrain.train import run as pretrain

    cfg = pretrain_config(None, base={
        "name": "mae-tiny", "out_dir": str(out),
        "data": {"shards": str(shards), "split": "train", "kinds": ["image2d"],
                 "batch_size": 64, "num_workers": 0},
        "model": {**ENC2D, "in_chans": 1},
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1}],
        "train": {"max_steps": 150, "lr": 1e-3, "warmup_steps": 10, "checkpoint_every": 1000,
                  "plots": False, "loggers": ["csv"], "log_every": 50},
    })  # fmt: skip
    return Path(pretrain(cfg)["export"]).parent


def write_pneumonia(
    root: Path, synthetic: bool = False, drop_train_class: int | None = None
) -> Path:
    """A subset of the official splits; each image is its own (pseudonymous) patient."""
    z = np.load(PNEUMONIA)
    rng = np.random.default_rng(1)
    with ShardSetWriter(str(root)) as w:
        for split, n in SIZES.items():
            labels = z[f"{split}_labels"].reshape(-1)
            idx = rng.choice(len(labels), n, replace=False)
            for i in idx:
                if (
                    split == "train"
                    and drop_train_class is not None
                    and labels[i] == drop_train_class
                ):
                    continue
                image = z[f"{split}_images"][i]
                prefix = "syn" if synthetic else "pm"
                w.write(Sample(
                    key=f"{prefix}-{split}-{i}", kind="image2d", modality="DX",
                    dataset="pneumoniamnist", patient_id=f"{split}{i}", split=split,
                    data=image[:, ::-1].copy() if synthetic else image,
                    labels={"label": int(labels[i])}, synthetic=synthetic, licence="CC BY 4.0",
                ))  # fmt: skip
        w.close(datasets={"pneumoniamnist": {"licence": "CC BY 4.0", "source": "MedMNIST v2"}})
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    if not PNEUMONIA.is_file():
        pytest.skip("MEDFM_SAMPLE_DATA/pneumoniamnist not available")
    base = tmp_path_factory.mktemp("finetune")
    shards = write_pneumonia(base / "shards")
    return {"base": base, "shards": shards, "encoder": pretrain_encoder(shards, base / "pretrain")}


def config(work: dict, name: str, **over) -> dict:
    cfg = {
        "name": name,
        "out_dir": str(work["base"] / "runs" / name),
        "encoder": str(work["encoder"]),
        "data": {"shards": str(work["shards"]), "batch_size": 32},
        "task": {"type": "binary", "label_key": "label", "label_names": ["normal", "pneumonia"]},
        "train": {"epochs": 3, "lr": 3e-3},
        "eval": {"bootstrap": 100},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def outputs_on_test(model, work: dict) -> torch.Tensor:
    """A loaded export's outputs on the test split, preprocessed per its medfm.json."""
    cfg = load_config(None, base=config(work, "x"))
    contract = model.contract
    ds = split_dataset(str(work["shards"]), "test", cfg, shuffle=False)
    collate = Collate(contract, task_for(cfg.task))
    return predict(model, loader(ds, collate, cfg), torch.device("cpu"))[0]


def expected_predictions(run_dir: Path) -> torch.Tensor:
    """What the run itself predicted on test, before export."""
    return load_file(run_dir / "test_outputs.safetensors")["outputs"]


def check_metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["split"] == "test" and m["resampling_unit"] == "patient"
    for name in ("auroc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity",
                 "ece", "brier"):  # fmt: skip
        v = m["metrics"][name]
        assert v["ci_low"] <= v["ci_high"], (name, v)
        if name != "ece":  # ECE is biased upwards on resamples: its point may sit below the CI
            assert v["ci_low"] <= v["value"] <= v["ci_high"], (name, v)
        assert v["n_boot"] > 90
    assert (run_dir / "roc.png").stat().st_size > 1000
    return m["metrics"]


@needs_pneumonia
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, epochs, lr",
    [("linear_probe", 60, 3e-2), ("lora", 10, 5e-3), ("full", 10, 2e-3)],
)
def test_modes_on_pneumoniamnist(work, mode, epochs, lr):
    cfg = load_config(
        None, base=config(work, mode, mode=mode, **{"train.epochs": epochs, "train.lr": lr})
    )
    out = run(cfg)
    metrics = check_metrics(out)
    assert metrics["auroc"]["value"] > 0.7, metrics["auroc"]  # chance is 0.5
    record = json.loads((out / "run.json").read_text())
    history = record["fit"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 1 <= record["fit"]["best_epoch"] <= epochs
    assert record["base_encoder"]["sha256"] == load_base_encoder(str(work["encoder"])).sha256
    work[mode] = out


@needs_pneumonia
@pytest.mark.slow
def test_lora_export_loads_with_peft_and_medfm_identically(work, tmp_path):
    from peft import PeftModel

    if "lora" not in work:
        pytest.skip("needs test_modes_on_pneumoniamnist[lora]")
    out = export(work["lora"], tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    for f in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors",
              "medfm.json", "README.md"):  # fmt: skip
        assert f in names
    meta = json.loads((out / "medfm.json").read_text())
    assert meta["label_names"] == ["normal", "pneumonia"]
    assert meta["base_encoder"]["sha256"] == load_base_encoder(str(work["encoder"])).sha256
    assert meta["preprocessing"]["image_size"] == 28
    assert meta["preprocessing"]["finetuning_source"]["modality"] == "DX"
    assert meta["preprocessing"]["pretraining_source"]["modality"] == "DX"
    assert (
        meta["metrics"]["values"]["auroc"]["ci_low"] <= meta["metrics"]["values"]["auroc"]["value"]
    )
    assert len(meta["data"]["shards"]["manifest_sha256"]) == 64
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["license"] == "CC BY 4.0"
    for words in ("Intended use", "patient-level", "De-identification", "95% CI"):
        assert words in card

    model = load(out)
    assert torch.equal(outputs_on_test(model, work), expected_predictions(work["lora"]))
    cfg = load_config(None, base=config(work, "x"))
    contract = model.contract
    test_ds = split_dataset(str(work["shards"]), "test", cfg, shuffle=False)
    # PEFT's own loader applies the same adapter to the base encoder.
    base = load_base_encoder(str(work["encoder"])).encoder
    peft_encoder = PeftModel.from_pretrained(base, str(out))
    x = next(iter(loader(test_ds, Collate(contract, task_for(cfg.task)), cfg)))[0]
    with torch.no_grad():
        ours = model.base_encoder().pooled(x)
        theirs = peft_encoder.get_base_model().pooled(x)
        plain = load_base_encoder(str(work["encoder"])).encoder.pooled(x)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, plain)  # the adapter does change the encoder


@needs_pneumonia
@pytest.mark.slow
def test_wrong_base_encoder_is_refused_naming_both_hashes(work, tmp_path):
    if "lora" not in work:
        pytest.skip("needs test_modes_on_pneumoniamnist[lora]")
    out = export(work["lora"], tmp_path / "export")
    other = write_encoder(
        tmp_path / "other", ENC2D, Contract(kind="image2d", image_size=28), seed=1
    )
    want = load_base_encoder(str(work["encoder"])).sha256
    got = load_base_encoder(str(other)).sha256
    with pytest.raises(BaseEncoderMismatchError, match=f"{want}.*{got}"):
        load(out, base=str(other))


@needs_pneumonia
def test_labels_table_with_class_absent_from_train(work, tmp_path):
    shards = write_pneumonia(tmp_path / "no-pneumonia", drop_train_class=1)
    cfg = load_config(None, base=config(work, "absent", **{"data.shards": str(shards)}))
    with pytest.raises(LabelError, match=r"\['pneumonia'\].*no samples in the train split"):
        run(cfg)
    bad_table = {"task.type": "multiclass", "task.label_names": ["normal"]}
    cfg = load_config(None, base=config(work, "unknown", **bad_table))
    with pytest.raises(LabelError, match="outside the labels table"):
        run(cfg)


@needs_pneumonia
@pytest.mark.slow
def test_synthetic_ratio_mixes_through_mixed_dataset(work):
    syn = write_pneumonia(work["base"] / "synthetic", synthetic=True)
    cfg = load_config(None, base=config(work, "syn"))
    real = split_dataset(str(work["shards"]), "train", cfg, shuffle=True)
    fake = split_dataset(str(syn), "train", cfg, shuffle=True)
    mixed = with_synthetic(real, fake, 0.25, seed=0)
    sources = [item["source"] for item in mixed]
    frac = sources.count("synthetic") / len(sources)
    n = len(sources)
    assert n == round(SIZES["train"] / 0.75) and len(real) == SIZES["train"]
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    cfg = load_config(None, base=config(work, "syn-run", mode="linear_probe", **{
        "data.synthetic": {"shards": str(syn), "ratio": 0.25, "allow_unaudited": True},
        "train.epochs": 2}))  # fmt: skip
    record = json.loads((run(cfg) / "run.json").read_text())
    assert record["data"]["synthetic"]["ratio"] == 0.25
    assert record["data"]["synthetic"]["audit"] == "none"  # never audited, trained on by choice
    assert record["data"]["synthetic"]["allow_unaudited"] is True
    assert len(record["data"]["synthetic"]["manifest_sha256"]) == 64
    share = record["fit"]["synthetic"]  # logged from the batches the model actually saw
    assert share["samples"] == n and share["within_tolerance"], share
    assert abs(share["realized"] - 0.25) <= 4 * (0.25 * 0.75 / n) ** 0.5


@needs_pneumonia
def test_a_synthetic_set_fine_tuned_on_directly_needs_an_audit_or_allow_unaudited(work):
    syn = work["base"] / "synthetic-direct"
    if not syn.exists():
        write_pneumonia(syn, synthetic=True)
    over = {"data.shards": str(syn), "mode": "linear_probe", "train.epochs": 1}
    with pytest.raises(ConfigError, match="data.shards: .* holds 560 synthetic samples and has "
                       "no audit.*data.allow_unaudited: true"):  # fmt: skip
        run(load_config(None, base=config(work, "direct", **over)))
    assert not (work["base"] / "runs" / "direct" / "run.json").exists()
    cfg = load_config(None, base=config(work, "direct", **over, **{"data.allow_unaudited": True}))
    with pytest.warns(UserWarning, match="data.allow_unaudited"):
        record = json.loads((run(cfg) / "run.json").read_text())
    assert record["data"]["shards"]["synthetic_audit"] == {
        "audit": "none", "audit_source": None, "generator_sha256": None,
        "allow_unaudited": True, "synthetic_rows": 560}  # fmt: skip


@needs_pneumonia
def test_few_shot_draws_k_per_class_by_seed(work):
    cfg = load_config(None, base=config(work, "fs"))
    rows = split_rows(str(work["shards"]), "train", cfg)
    targets = np.array([json.loads(r["labels"])["label"] for r in rows])
    task = task_for(cfg.task)
    a = task.few_shot_keys(rows, targets, 5, 0)
    assert a == task.few_shot_keys(rows, targets, 5, 0)
    assert a != task.few_shot_keys(rows, targets, 5, 1)
    by_key = dict(zip([r["key"] for r in rows], targets, strict=True))
    assert sorted(by_key[k] for k in a) == [0] * 5 + [1] * 5
    cfg = load_config(None, base=config(work, "fs-run", mode="linear_probe", **{
        "train.few_shot_k": 8, "train.epochs": 2}))  # fmt: skip
    assert json.loads((run(cfg) / "run.json").read_text())["fit"]["counts"]["train_rows"] == 16


@needs_pneumonia
def test_cli_finetune_from_hub_encoder_and_export(work, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HUB", str(tmp_path / "hub"))
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pulls"))
    rev = hub.push(work["encoder"], "lab/vit2d-tiny@v1")
    cfg = config(work, "cli", mode="linear_probe", encoder="hub://lab/vit2d-tiny@v1",
                 **{"train.epochs": 2, "out_dir": str(tmp_path / "run"),
                    "eval.threshold": "val_youden"})  # fmt: skip
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from medfm.cli import app

    res = CliRunner().invoke(app, ["finetune", "--config", str(path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, ["finetune", "export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "exp" / "medfm.json").read_text())
    assert meta["base_encoder"]["uri"] == "hub://lab/vit2d-tiny@v1"
    assert rev  # pushed; the export then round-trips through the hub too
    hub.push(tmp_path / "exp", "lab/pneumonia-probe@v1")
    model = load("hub://lab/pneumonia-probe@v1")
    assert model.medfm["mode"] == "linear_probe"
    assert torch.equal(outputs_on_test(model, work), expected_predictions(tmp_path / "run"))

    # A hub user scores the pulled model from the CLI: the run's test AUROC, and its ROC PNG.
    roc = tmp_path / "roc.png"
    res = CliRunner().invoke(app, ["finetune", "evaluate", "hub://lab/pneumonia-probe@v1",
                                   "--config", str(path), "--roc", str(roc)])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run_metrics = summary["metrics"]
    assert got["auroc"]["value"] == run_metrics["auroc"]["value"] and got["n"] > 0
    assert meta["threshold"] == summary["threshold"] != 0.5  # chosen on val, in the export
    assert got["accuracy"]["value"] == run_metrics["accuracy"]["value"]
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["finetune", "evaluate", str(tmp_path / "nope"),
                                   "--config", str(path)])  # fmt: skip
    assert res.exit_code == 1 and "nope" in res.output


def test_bundled_configs_validate(tmp_path):
    folder = Path(__file__).resolve().parents[1] / "finetune" / "configs"
    configs = sorted(folder.glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


# -- 3D segmentation on the real TotalSegmentator CT ------------------------------------------
ENC3D = {"name": "vit3d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
         "img_size": [32, 32, 16], "patch_size": [8, 8, 8]}  # fmt: skip


def write_ct_slabs(root: Path) -> Path:
    """The one real CT, cut into three disjoint slabs along j (one per split)."""
    import nibabel as nib

    ct = nib.load(CT)
    seg = np.asarray(nib.load(CT.with_name("example_seg.nii.gz")).dataobj)
    image = np.asarray(ct.dataobj)
    slabs = {"val": (0, 34), "train": (34, 67), "test": (67, 101)}
    with ShardSetWriter(str(root)) as w:
        for split, (a, b) in slabs.items():
            affine = ct.affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.array([0, a, 0]) + affine[:3, 3]
            w.write(Sample(
                key=f"ct-{split}", kind="volume3d", modality="CT", dataset="totalsegmentator",
                patient_id=f"slab-{split}", split=split, data=image[:, a:b].copy(),
                label_map=seg[:, a:b].copy(), geometry=Geometry.from_nifti_affine(affine),
                licence="Apache-2.0",
            ))  # fmt: skip
        w.close(datasets={"totalsegmentator": {"licence": "Apache-2.0"}})
    return root


@needs_ct
@pytest.mark.slow
def test_3d_segmentation_finetune_reports_dice(tmp_path):
    shards = write_ct_slabs(tmp_path / "ct")
    contract = Contract(kind="volume3d", intensity="window", window=(-200.0, 300.0),
                        channels=1, patch_size=(32, 32, 16))  # fmt: skip
    encoder = write_encoder(tmp_path / "enc3d", ENC3D, contract)
    cfg = load_config(None, base={
        "name": "liver", "out_dir": str(tmp_path / "run"), "encoder": str(encoder), "mode": "full",
        "data": {"shards": str(shards), "batch_size": 4},
        "task": {"type": "segmentation", "label_names": ["background", "liver"],
                 "label_values": [0, 5], "overlap": 0.25},
        "train": {"epochs": 6, "lr": 3e-3, "patches_per_volume": 24},
        "eval": {"bootstrap": 20},
    })  # fmt: skip
    out = run(cfg)
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("dice", "iou", "hd95", "nsd"):
        assert np.isfinite(m[name]["value"]), (name, m[name])
    assert 0.3 < m["dice"]["value"] <= 1.0  # liver is ~20% of the test slab
    assert (out / "seg_overlays.png").stat().st_size > 1000
    history = json.loads((out / "run.json").read_text())["fit"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    exp = export(out, tmp_path / "exp")
    model = load(exp)
    x = torch.rand(1, 1, 32, 32, 16)
    assert model(x).shape == (1, 2, 32, 32, 16)


@needs_ct
@pytest.mark.slow
def test_2d_segmentation_finetune_on_ct_slices(tmp_path):
    """Axial slices of the real CT as 2D images with label maps (each slice a pseudo-patient)."""
    import nibabel as nib

    image = np.asarray(nib.load(CT).dataobj)
    seg = np.asarray(nib.load(CT.with_name("example_seg.nii.gz")).dataobj)
    splits = {k: "train" for k in range(8, 24)} | {k: "val" for k in range(24, 27)}
    splits |= {k: "test" for k in range(27, 30)}
    with ShardSetWriter(str(tmp_path / "slices")) as w:
        for k, split in splits.items():
            w.write(Sample(
                key=f"slice-{k}", kind="image2d", modality="CT", dataset="totalsegmentator",
                patient_id=f"slice{k}", split=split, data=image[:, :, k].copy(),
                label_map=seg[:, :, k].copy(), spacing=(3.0, 3.0), licence="Apache-2.0",
            ))  # fmt: skip
    contract = Contract(kind="image2d", intensity="window", window=(-200.0, 300.0), channels=1,
                        image_size=32)  # fmt: skip
    spec = {**ENC2D, "img_size": 32, "patch_size": 8}
    encoder = write_encoder(tmp_path / "enc", spec, contract)
    cfg = load_config(None, base={
        "name": "liver2d", "out_dir": str(tmp_path / "run"), "encoder": str(encoder),
        "mode": "lora", "data": {"shards": str(tmp_path / "slices"), "batch_size": 8},
        "task": {"type": "segmentation", "label_names": ["background", "liver"],
                 "label_values": [0, 5]},
        "train": {"epochs": 8, "lr": 3e-3}, "eval": {"bootstrap": 20},
    })  # fmt: skip
    out = run(cfg)
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.3 < m["dice"]["value"] <= 1.0, m["dice"]
    assert np.isfinite(m["hd95"]["value"]) and (out / "seg_overlays.png").is_file()
