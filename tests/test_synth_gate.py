"""The audit's thresholds and the gate in front of training, on real PneumoniaMNIST X-rays.

Calibration: new real images (the test split) must pass the shipped thresholds, while uniform
noise and copies of the training set must fail them. The gate: pretraining and fine-tuning refuse
a synthetic set without a passing audit of its current rows, unless `allow_unaudited` says
otherwise, which the run records, whether the set is mixed in (`data.synthetic`) or trained on
directly (`data.shards`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synth_helpers import npz_path, write_pneumonia

from medfm.config import ConfigError
from medfm.shards import (
    Manifest,
    Sample,
    ShardSet,
    ShardSetWriter,
    SyntheticConfig,
    check_synthetic,
    check_training_set,
)
from medfm.synth.audit import audit, load_audit_config
from medfm.synth.contract import observed_contract

GENERATOR = "ab" * 32
N = 96


def synthetic_set(root: Path, images: np.ndarray, real: str, audit_record: dict | None = None):
    """Images written as a synthetic set declaring the real set's contract (what `synth
    generate` records), so that the audit compares like with like."""
    m = Manifest.open(real)
    contract = observed_contract(m, [r for r in m.rows() if r["split"] == "train"])
    contract["intensity"] = {"mode": "window", "low": 0.0, "high": 255.0}  # uint8's range
    info = {"generator_sha256": GENERATOR, "contract": contract}
    if audit_record:
        info["audit"] = audit_record
    with ShardSetWriter(str(root), overwrite=True) as w:  # a rewrite keeps audit/ of the old
        for i, img in enumerate(images):
            w.write(
                Sample(
                    key=f"syn-{i:05d}", kind="image2d", modality="CR", dataset="syn",
                    patient_id=f"synthetic-{i:07d}", split="train", data=img,
                    labels={"class": i % 2}, synthetic=True, generator=GENERATOR,
                )
            )  # fmt: skip
        w.close(attributes={"synthetic": info})
    return str(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    real = tmp / "real"
    train = write_pneumonia(real, {"train": 600, "val": 500})  # calibrates the 1% flag
    new_real = np.load(npz_path())["test_images"][:N]
    noise = np.random.default_rng(0).integers(0, 256, (N, 28, 28), dtype=np.uint8)
    return {
        "tmp": tmp,
        "real": str(real),
        "new": synthetic_set(tmp / "new", new_real, str(real)),
        "noise": synthetic_set(tmp / "noise", noise, str(real)),
        "copy": synthetic_set(tmp / "copy", train[:N], str(real)),
    }


def audited(sets, name: str) -> dict:
    root = sets[name]
    cfg = load_audit_config(overrides={"msssim_pairs": 100})
    return audit(root, sets["real"], f"{root}/audit", cfg)


def test_new_real_images_pass_and_noise_and_copies_fail_the_shipped_thresholds(sets):
    new = audited(sets, "new")
    assert new["verdict"] == "pass", new["checks"]
    noise = {c["name"]: c for c in audited(sets, "noise")["checks"]}
    assert not noise["frechet_ratio"]["pass"] and not noise["precision_ratio"]["pass"], noise
    copy = audited(sets, "copy")
    assert copy["verdict"] == "fail"
    assert not {c["name"]: c for c in copy["checks"]}["flagged_fraction"]["pass"], copy["checks"]
    # Every check is judged: none is reported without a threshold.
    assert all(c["max"] is not None or c["min"] is not None for c in copy["checks"])


def test_the_gate_takes_only_a_passing_audit_of_the_current_rows(sets):
    audited(sets, "new")
    record = check_synthetic(SyntheticConfig(sets["new"]))
    assert record == {"audit": "pass", "audit_source": "audit/report.json",
                      "generator_sha256": GENERATOR, "allow_unaudited": False}  # fmt: skip
    audited(sets, "noise")
    with pytest.raises(ConfigError, match="failed its audit.*allow_unaudited: true"):
        check_synthetic(SyntheticConfig(sets["noise"]))
    # A set rewritten after its audit: the old report describes other rows.
    stale = sets["tmp"] / "stale"
    synthetic_set(stale, np.load(npz_path())["test_images"][:N], sets["real"])
    audit(str(stale), sets["real"], str(stale / "audit"), load_audit_config())
    synthetic_set(stale, np.load(npz_path())["test_images"][N : 2 * N], sets["real"])
    with pytest.raises(ConfigError, match="has no audit of its current contents"):
        check_synthetic(SyntheticConfig(str(stale)))
    with pytest.raises(ConfigError, match="is not a synthetic shard set"):
        check_synthetic(SyntheticConfig(sets["real"], allow_unaudited=True))
    with pytest.raises(ConfigError, match="data.synthetic.shards: .*no manifest.json"):
        check_synthetic(SyntheticConfig(str(sets["tmp"] / "absent")))


def test_a_verdict_in_the_header_counts_and_allow_unaudited_is_recorded(sets):
    images = np.load(npz_path())["test_images"][:8]
    passed = synthetic_set(sets["tmp"] / "h-pass", images, sets["real"], {"verdict": "pass"})
    assert check_synthetic(SyntheticConfig(passed))["audit_source"] == "header"
    failed = synthetic_set(sets["tmp"] / "h-fail", images, sets["real"], {"verdict": "fail"})
    with pytest.warns(UserWarning, match="failed its audit"):
        record = check_synthetic(SyntheticConfig(failed, allow_unaudited=True))
    assert record["audit"] == "fail" and record["allow_unaudited"] is True


def mixed_set(root: Path, real: str, synthetic: str) -> str:
    """Real rows and synthetic rows in one set, as a user might merge them by hand."""
    with ShardSetWriter(str(root), overwrite=True) as w:
        for src in (real, synthetic):
            opened = ShardSet(src)
            for row in list(opened.rows())[:8]:
                w.write(opened.read_sample(row))
        w.close()
    return str(root)


def test_a_set_trained_on_directly_is_gated_by_its_synthetic_rows(sets):
    assert check_training_set(sets["real"], allow_unaudited=False) is None  # real rows only
    audited(sets, "new")
    record = check_training_set(sets["new"], allow_unaudited=False)
    assert record == {"audit": "pass", "audit_source": "audit/report.json",
                      "generator_sha256": GENERATOR, "allow_unaudited": False,
                      "synthetic_rows": N}  # fmt: skip
    audited(sets, "noise")
    with pytest.raises(ConfigError, match=rf"data.shards: .* holds {N} synthetic samples and "
                       "failed its audit.*data.allow_unaudited: true"):  # fmt: skip
        check_training_set(sets["noise"], allow_unaudited=False)
    # A passing audit of the synthetic set does not carry over to a set merged from it.
    mixed = mixed_set(sets["tmp"] / "mixed", sets["real"], sets["new"])
    with pytest.raises(ConfigError, match="holds 8 synthetic samples and has no audit"):
        check_training_set(mixed, allow_unaudited=False)
    with pytest.warns(UserWarning, match="data.allow_unaudited: true"):
        record = check_training_set(mixed, allow_unaudited=True)
    assert record["audit"] == "none" and record["allow_unaudited"] is True


def test_pretraining_directly_on_an_unaudited_set_is_refused_or_recorded(sets, tmp_path):
    from pretrain_helpers import DECODER, TINY, base_config

    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    model = {"name": "vit2d", **TINY, "img_size": 28, "patch_size": 7}
    objective = {"name": "mae", "mask_ratio": 0.75, **DECODER}
    cfg = base_config(tmp_path, Path(sets["noise"]), model, [objective], max_steps=2)
    audited(sets, "noise")
    with pytest.raises(ConfigError, match="data.shards: .* failed its audit"):
        run(load_config(None, base=cfg))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training began
    cfg["data"]["allow_unaudited"] = True
    with pytest.warns(UserWarning, match="data.allow_unaudited"):
        run(load_config(None, base=cfg))
    sidecar = json.loads((tmp_path / "run" / "export" / "encoder.json").read_text())
    assert sidecar["data"]["training_set_audit"] == {sets["noise"]: {
        "audit": "fail", "audit_source": "audit/report.json", "generator_sha256": GENERATOR,
        "allow_unaudited": True, "synthetic_rows": N}}  # fmt: skip


def test_pretraining_refuses_an_unaudited_set_and_records_the_override(sets, tmp_path):
    from pretrain_helpers import DECODER, TINY, base_config

    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    model = {"name": "vit2d", **TINY, "img_size": 28, "patch_size": 7}
    objective = {"name": "mae", "mask_ratio": 0.75, **DECODER}
    cfg = base_config(tmp_path, Path(sets["real"]), model, [objective], max_steps=2)
    cfg["data"]["synthetic"] = {"shards": sets["noise"], "ratio": 0.3}
    audited(sets, "noise")
    with pytest.raises(ConfigError, match="data.synthetic.shards: .* failed its audit"):
        run(load_config(None, base=cfg))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training began
    cfg["data"]["synthetic"]["allow_unaudited"] = True
    with pytest.warns(UserWarning, match="allow_unaudited"):
        run(load_config(None, base=cfg))
    sidecar = json.loads((tmp_path / "run" / "export" / "encoder.json").read_text())
    assert sidecar["data"]["synthetic_audit"] == {"audit": "fail", "audit_source":
        "audit/report.json", "generator_sha256": GENERATOR, "allow_unaudited": True}  # fmt: skip


def test_audit_cli_names_a_folder_that_is_not_a_shard_set(tmp_path):
    from typer.testing import CliRunner

    from medfm.synth.cli import app

    (tmp_path / "notes").mkdir()
    res = CliRunner().invoke(
        app, ["audit", "--synthetic", str(tmp_path / "notes"), "--real", str(tmp_path)]
    )
    assert res.exit_code == 2, res.output  # an error line, not a traceback
    assert "no manifest.json; not a finished shard set" in res.output, res.output
