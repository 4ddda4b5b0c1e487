"""`medfm demo --quick` end to end, as a user runs it: on the real sample data every stage runs,
the shard sets verify with train, val and test patients in each, report.html links PNGs that
exist, and the export pulled back from the hub loads through `medfm.finetune.load` and scores
what the fine-tuning run scored. Without MEDFM_SAMPLE_DATA the stages that need it are skipped
with their reason and the rest runs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from browser_helpers import check_page

from medfm.finetune import load, load_config
from medfm.ingest.load import load_spec
from medfm.ingest.privacy import Keyring, split_for
from medfm.shards import Manifest, verify

ALL_STAGES = [
    "stage xray PNGs", "ingest imaging", "ingest ecg", "ingest ehr", "ingest xray", "verify",
    "pretrain mae2d", "pretrain diffusion", "synth generate", "synth audit", "finetune lora",
    "export + hub", "evaluate pulled export", "pretrain mae3d", "segment liver 3D",
    "pretrain mae1d", "probe ecg beats", "pretrain mcm", "probe ehr readmission",
]  # fmt: skip
ECG_EHR_STAGES = ALL_STAGES[-4:]


def run_demo(medfm_exe: str, out: Path, sample_data: Path | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDFM_SAMPLE_DATA"}
    if sample_data:
        env["MEDFM_SAMPLE_DATA"] = str(sample_data)
    proc = subprocess.run(
        [medfm_exe, "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text()), proc.stdout


def section_pngs(out: Path) -> dict[str, list[str]]:
    """{h2 heading: the PNGs linked under it} of report.html."""
    page = (out / "report.html").read_text()
    parts = re.split(r"<h2>([^<]+)</h2>", page)[1:]
    pairs = zip(parts[::2], parts[1::2], strict=True)
    return {h: re.findall(r'<img src="([^"]+)"', body) for h, body in pairs}


def linked_pngs(out: Path) -> list[str]:
    links = re.findall(r'<img src="([^"]+)"', (out / "report.html").read_text())
    for rel in links:
        assert rel.endswith(".png") and (out / rel).stat().st_size > 1000, rel
    return links


@pytest.mark.slow
def test_quick_demo_runs_every_stage_on_real_data(sample_data, medfm_exe, tmp_path):
    out = tmp_path / "demo-out"
    summary, stdout = run_demo(medfm_exe, out, sample_data)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ALL_STAGES
    assert all(s["status"] == "ok" and s["wall_s"] > 0 for s in stages.values()), stages
    table = stdout[stdout.index("stage  ") :]
    assert all(name in table for name in ALL_STAGES) and "\ntotal " in table

    links = linked_pngs(out)
    for want in ("mae2d/plots/loss.png", "mae2d/plots/mae_step", "diffusion/plots/loss.png",
                 "audit/report.png", "audit/closest_pairs.png", "roc_pulled.png"):  # fmt: skip
        assert any(want in rel for rel in links), (want, links)
    # ECG and EHR have their own sections: loss curve, (MAE) reconstructions, downstream ROC.
    by_section = section_pngs(out)
    for section, wants in (
        ("ECG", ("mae1d/plots/loss.png", "mae1d/plots/mae_step", "runs/roc_ecg_beats.png")),
        ("EHR", ("mcm/plots/loss.png", "runs/roc_ehr_readmission.png")),
    ):
        for want in wants:
            assert any(want in rel for rel in by_section[section]), (section, want, by_section)
    page_text = (out / "report.html").read_text()
    assert "Test AUROC" in page_text and "interval is wide" in page_text
    # The report as a reader sees it: loaded in a real browser, every image decoded.
    page = check_page(out / "report.html")
    assert page["images"] == len(links) and page["broken"] == [], page
    assert page["screenshot"] == out / "report-screenshot.png"

    assert len(summary["verified"]) == 4
    for root in summary["verified"]:
        report = verify(root)
        assert report.ok and report.rows_checked > 0, report.errors
        # Each modality has >= 3 patients here (ECG: 4 records), and the demo picks a split
        # seed that gives train, val and test one patient at least, whatever its fresh key.
        splits = Counter(r["split"] for r in Manifest.open(root).rows())
        assert set(splits) == {"train", "val", "test"}, (root, splits)
    ecg = load_spec(out / "configs" / "ingest_ecg.yaml")
    assert {s.name for s in ecg.sources} == {"pydicom_ecg", "mitdb", "ptbdb", "multisegment"}
    rows = list(Manifest.open(str(out / "shards" / "xray")).rows(decode_json=True))
    assert {r["labels"]["label"] for r in rows} == {0, 1}
    assert all(r["patient_id"].startswith("P") for r in rows)  # keyed pseudonyms
    assert not any("pneumoniamnist-" in r["patient_id"] for r in rows)  # never the raw ids

    # The configs the demo ran are the stages' own files: each loads through its stage's loader.
    from medfm.pretrain.config import load_config as pretrain_config

    for name in ("imaging", "ecg", "ehr", "xray"):
        load_spec(out / "configs" / f"ingest_{name}.yaml")
    for name in ("mae2d", "diffusion", "mae3d", "mae1d", "mcm"):
        pretrain_config(out / "configs" / f"pretrain_{name}.yaml")
    cfg = load_config(out / "configs" / "finetune_lora.yaml")
    assert any(c.startswith("medfm finetune --config") for c in summary["commands"])

    # The pulled export loads and predicts exactly what the run predicted on the test split.
    pulled = Path(summary["evaluation"]["export"])
    assert pulled == out / "pulled" / "pneumonia-lora"
    model = load(pulled)
    assert model.medfm["label_names"] == ["normal", "pneumonia"]
    run_metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())["metrics"]
    assert summary["evaluation"]["auroc"] == pytest.approx(run_metrics["auroc"]["value"])
    assert summary["evaluation"]["auroc"] > 0.5  # better than chance after one epoch
    assert summary["audit"]["verdict"] in ("pass", "fail")
    check_ecg_and_ehr_probes(out, summary)
    check_segmentation(out, summary, by_section["3D segmentation"])


def check_segmentation(out: Path, summary: dict, section_pngs: list[str]) -> None:
    """Liver Dice of the export pulled back from the hub, with its CI over blocks of the test
    slab; the overlay under the report's 3D section; slabs a patch apart, and the written
    config's training patches all inside the train slab."""
    from medfm.finetune.data import contract_for
    from medfm.finetune.encoder import load_base_encoder
    from medfm.finetune.segment import train_dataset

    seg = summary["segmentation"]
    dice = seg["dice"]
    assert all(math.isfinite(dice[k]) for k in ("value", "ci_low", "ci_high")), dice
    assert 0.0 <= dice["ci_low"] <= dice["ci_high"] <= 1.0 and 0.0 <= dice["value"] <= 1.0
    assert seg["n_blocks"] > 1 and seg["run_dice"] == pytest.approx(dice["value"])
    pulled, exported = Path(seg["export"]), out / "exports" / "liver-unetr"
    assert pulled == out / "pulled" / "liver-unetr" and seg["hub"]["files"] > 0
    for f in exported.iterdir():  # the hub gave back exactly what was pushed
        assert (pulled / f.name).read_bytes() == f.read_bytes(), f.name
    assert load(pulled).medfm["task"]["label_names"] == ["background", "liver"]
    for want in ("mae3d/plots/loss.png", "runs/liver_overlay_pulled.png"):
        assert any(want in rel for rel in section_pngs), (want, section_pngs)
    assert "One CT" in (out / "report.html").read_text()

    cfg = load_config(out / "configs" / "finetune_liver.yaml")
    base = load_base_encoder(cfg.encoder)
    contract = contract_for(base.preprocessing, base.encoder, cfg)
    slabs, axis = seg["slabs"], seg["slabs"]["axis"]
    spans = sorted(tuple(slabs[k]) for k in ("train", "val", "test"))
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        assert start - stop >= contract.patch_size[axis] == slabs["gap"], spans
    lo, hi = slabs["train"]
    patches = train_dataset(cfg.data.shards, contract, cfg)
    starts = [it["meta"]["patch_start"][axis] for it in patches]
    assert starts and all(lo <= s <= max(lo, hi - contract.patch_size[axis]) for s in starts)


def check_ecg_and_ehr_probes(out: Path, summary: dict) -> None:
    """The downstream figures come with a CI, and their splits are what the report says: beat
    windows apart in time (train before test, 30 s between), readmission split by patient with
    no test patient seen in pretraining."""
    from medfm.demo.probes import ECG_GAP_S, ecg_beats, ehr_discharges
    from medfm.finetune.encoder import load_base_encoder

    for key in ("ecg_beats", "ehr_readmission"):
        m = summary[key]
        a, c = m["auroc"], m["counts"]
        assert 0.0 <= a["ci_low"] <= a["value"] <= a["ci_high"] <= 1.0, (key, a)
        assert c["train_positive"] > 0 and c["test_positive"] > 0, (key, c)
        assert c["test_positive"] < c["test"], (key, c)

    shards = out / "shards"
    start = {r["key"]: r["meta"]["window_start_s"]
             for r in Manifest.open(str(shards / "ecg")).rows(decode_json=True)}  # fmt: skip
    base = load_base_encoder(str(out / "runs" / "mae1d" / "export"))
    beats = ecg_beats(shards / "ecg", base.encoder.eval(), base.preprocessing)
    t = [start[k] for k in beats.clusters]
    train_t = [x for x, tr in zip(t, beats.train, strict=True) if tr]
    test_t = [x for x, tr in zip(t, beats.train, strict=True) if not tr]
    assert max(train_t) + ECG_GAP_S <= min(test_t), (max(train_t), min(test_t))
    assert len(beats.labels) == summary["ecg_beats"]["counts"]["train"] + len(test_t)

    split_of = {r["patient_id"]: r["split"] for r in Manifest.open(str(shards / "ehr")).rows()}
    encoder = load_base_encoder(str(out / "runs" / "mcm" / "export")).encoder.eval()
    visits, _ = ehr_discharges(shards / "ehr", encoder)
    train_p = {p for p, tr in zip(visits.clusters, visits.train, strict=True) if tr}
    test_p = {p for p, tr in zip(visits.clusters, visits.train, strict=True) if not tr}
    assert train_p and test_p and not train_p & test_p
    assert {split_of[p] for p in train_p} == {"train"}  # the MCM's pretraining split
    assert {split_of[p] for p in test_p} <= {"val", "test"}


@pytest.mark.slow
def test_quick_demo_without_sample_data_skips_what_needs_it(medfm_exe, tmp_path):
    out = tmp_path / "demo-out"
    summary, stdout = run_demo(medfm_exe, out, None)
    stages = {s["stage"]: s for s in summary["stages"]}
    ran = [n for n, s in stages.items() if s["status"] == "ok"]
    assert ran == ["ingest imaging", "ingest ecg", "verify", "pretrain mae3d"]
    skipped = {n: s["metric"] for n, s in stages.items() if s["status"] == "skipped"}
    assert set(skipped) == {"ingest ehr", "ingest xray", "pretrain diffusion", "synth generate",
                            "synth audit", "finetune lora", "export + hub",
                            "evaluate pulled export", "segment liver 3D",
                            *ECG_EHR_STAGES}  # fmt: skip
    assert all("MEDFM_SAMPLE_DATA is unset" in why for why in skipped.values()), skipped
    assert all(f"{name}: SKIPPED" in stdout for name in skipped)
    assert all(verify(root).ok for root in summary["verified"])
    assert any("mae3d/plots/loss.png" in rel for rel in linked_pngs(out))


def test_rerun_replaces_only_the_demo_outputs(tmp_path):
    from medfm.demo.job import prepare

    out = tmp_path / "out"
    key = prepare(out, overwrite=False)
    (out / "shards" / "old").mkdir(parents=True)
    (out / "report.html").write_text("old")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(SystemExit, match="earlier demo"):
        prepare(out, overwrite=False)
    secret = key.read_text()
    assert prepare(out, overwrite=True) == key and key.read_text() == secret  # same pseudonyms
    assert not (out / "shards").exists() and not (out / "report.html").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_split_seed_gives_every_split_a_patient_whatever_the_key():
    from medfm.demo.stages import split_seed

    fractions = [0.8, 0.1, 0.1]
    for i in range(20):  # 20 fresh keys, as 20 fresh demo output folders would make
        keyring = Keyring(os.urandom(32).hex().encode())
        patients = {keyring.patient(raw) for raw in ("100", "s0010_re", "041s")}
        seed = split_seed(keyring, patients, fractions)
        got = {split_for(keyring, p, fractions, seed) for p in patients}
        assert got == {"train", "val", "test"}, (i, seed)
        assert split_seed(keyring, patients, fractions) == seed  # same key, same seed
    assert split_seed(keyring, set(list(patients)[:2]), fractions) is None  # 2 cannot fill 3
    for i in range(20):  # the 3D MAE trains on nibabel's one patient: it must be in train
        keyring = Keyring(os.urandom(32).hex().encode())
        alone = frozenset({keyring.patient("nibabel")})
        seed = split_seed(keyring, patients | alone, fractions, alone)
        assert split_for(keyring, next(iter(alone)), fractions, seed) == "train", (i, seed)
