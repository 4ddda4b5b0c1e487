"""The demo's stages: each writes its spec/config to `<out>/configs/`, runs exactly that file
through the stage's public API (what its `medfm` subcommand calls), and adds a summary row, the
command that reruns it alone and the PNGs it wrote.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfm.ingest.privacy import Keyring, split_for
from medfm.ingest.spec import SplitSpec

from . import configs as dc

SPLITS = ("train", "val", "test")

HUB_REPO = "demo/pneumonia-lora@v1"
SEG_REPO = "demo/liver-unetr@v1"
ECG_SECTION, EHR_SECTION, SEG_SECTION = "ECG", "EHR", "3D segmentation"
PREVIEWS = {"mae": "inputs, masked inputs, reconstructions",
            "diffusion": "training images and samples"}  # fmt: skip


@dataclass
class Row:
    """One line of the summary table."""

    stage: str
    wall_s: float = 0.0
    items: str = ""
    metric: str = ""
    status: str = "ok"  # ok | skipped


@dataclass
class Demo:
    """One run's bookkeeping: the summary rows, the per-stage commands, the PNGs to link."""

    out: Path
    scale: dc.Scale
    inputs: dc.Inputs
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (section, caption, png)
    results: dict[str, Any] = field(default_factory=dict)
    cluster: Any = None  # a medfm.demo.cluster.DemoCluster: the stages run on a Ray cluster

    @contextmanager
    def stage(self, name: str):
        print(f"\n[demo] == {name}", flush=True)
        row = Row(name)
        t0 = time.perf_counter()
        yield row
        row.wall_s = time.perf_counter() - t0
        self.rows.append(row)
        print(f"[demo] {name}: {row.items} {row.metric} ({row.wall_s:.1f} s)", flush=True)

    def skip(self, name: str, reason: str) -> None:
        print(f"\n[demo] == {name}: SKIPPED, {reason}", flush=True)
        self.rows.append(Row(name, items="-", metric=f"skipped: {reason}", status="skipped"))

    def config(self, name: str, tree: dict[str, Any], command: str) -> Path:
        """Write a stage's YAML and remember the command that runs it alone."""
        path = self.out / "configs" / f"{name}.yaml"
        command = command.replace("{}", str(path))
        if command not in self.commands:  # a rewritten config keeps its one command
            self.commands.append(command)
        return dc.write_yaml(tree, path, f"Run alone: {command}")

    def figure(self, section: str, caption: str, path: Path) -> None:
        if path.is_file():
            self.figures.append((section, caption, path))


def ingest(d: Demo, key: Path) -> dict[str, Path]:
    """Every available source through the real ingest job (one local Ray runtime for all); a
    modality whose split left train, val or test empty is ingested again (see `reseed`)."""
    import ray

    from medfm.ingest.job import run_ingest
    from medfm.ingest.load import load_spec

    specs: dict[str, dict[str, Any]] = {
        "imaging": dc.imaging_spec(d.inputs, key),
        "ecg": dc.ecg_spec(d.inputs, key),
    }
    mimic = d.inputs.sample_file("mimic-iv-demo-2.2")
    if mimic:
        specs["ehr"] = dc.ehr_spec(mimic, key)
    npz = d.inputs.sample_file(dc.XRAY_NPZ)
    if npz:
        with d.stage("stage xray PNGs") as row:
            staged = d.out / "staging" / "pneumoniamnist"
            n = dc.stage_xrays(npz, staged, d.scale.xrays)
            row.items, row.metric = f"{n} PNGs", "+ labels.csv (the user-data layout)"
        specs["xray"] = dc.xray_spec(staged, key)
    shards = {}
    keyring = Keyring.load(str(key))
    if d.cluster is None:  # else the driver is connected to the cluster: its tasks go there
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for name, spec in specs.items():
            dest = d.out / "shards" / name
            cmd = f"medfm ingest {{}} --out {dest}  # remove {dest} first, or add --resume"
            with d.stage(f"ingest {name}") as row:
                s = run_ingest(load_spec(d.config(f"ingest_{name}", spec, cmd)), str(dest))
                seed = reseed(keyring, spec, s.by_split, dest, dc.TRAIN_ALONE.get(name, ()))
                if seed is not None:
                    print(
                        f"[demo] {name}: splits {s.by_split} leave one empty; ingesting again "
                        f"with split.seed {seed}, the first seed that gives each a patient"
                    )
                    shutil.rmtree(dest)
                    spec["split"] = {"seed": seed}
                    s = run_ingest(load_spec(d.config(f"ingest_{name}", spec, cmd)), str(dest))
                print(s.line())
                row.items = f"{s.written} samples"
                row.metric = (f"{s.quarantined} quarantined, {s.duplicates} duplicates dropped, "
                              f"splits {s.by_split}")  # fmt: skip
            shards[name] = dest
    finally:
        if d.cluster is None:
            ray.shutdown()
    if not mimic:
        d.skip("ingest ehr", f"needs the MIMIC-IV demo ({d.inputs.missing('mimic-iv-demo-2.2')})")
    if not npz:
        d.skip("ingest xray", f"needs PneumoniaMNIST ({d.inputs.missing(dc.XRAY_NPZ)})")
    if not d.inputs.sample_file("wfdb"):
        print(f"[demo] ecg: the PhysioNet WFDB records left out ({d.inputs.missing('wfdb')}); "
              "only pydicom's 12-lead ECG is ingested: one patient, all in one split")  # fmt: skip
    return shards


def split_seed(keyring: Keyring, patients: set[str], fractions: list[float],
               train_from: frozenset[str] = frozenset()) -> int | None:  # fmt: skip
    """The first seed from 0 whose patient-level split puts at least one of `patients` (their
    pseudonyms) in each of train, val and test, and every one of `train_from` in train;
    None with fewer than 3 patients. Deterministic given the key, so a rerun with the same
    key picks the same seed. With 3 patients and 80/10/10 one seed in 21 works; 1,000 tries
    all fail with probability below 1e-21."""
    if len(patients) < 3:
        return None
    for seed in range(1000):
        split = {p: split_for(keyring, p, fractions, seed) for p in patients}
        trains = all(split[p] == "train" for p in train_from)
        if set(split.values()) == set(SPLITS) and trains:
            return seed
    return None


def reseed(
    keyring: Keyring,
    spec: dict[str, Any],
    by_split: dict[str, int],
    dest: Path,
    train_datasets: tuple[str, ...] = (),
) -> int | None:
    """A split seed to ingest `spec` again with, when its first run left a split empty and its
    patients can fill all three; else None. The demo's datasets are small (4 ECG patients), and
    its key is new on each fresh output folder, so the default seed often leaves val or test
    empty, or a patient of `train_datasets` (those a stage trains on alone, one patient each)
    out of train; the seed chosen is written into the spec, which then reproduces the splits
    alone."""
    from medfm.shards import Manifest

    rows = list(Manifest.open(str(dest)).rows())
    mine = frozenset(r["patient_id"] for r in rows if r["dataset"] in train_datasets)
    trained = all(r["split"] == "train" for r in rows if r["patient_id"] in mine)
    if all(by_split.get(name) for name in SPLITS) and trained:
        return None
    patients = {r["patient_id"] for r in rows}
    fractions = spec.get("split", {}).get("fractions", SplitSpec().fractions)
    seed = split_seed(keyring, patients, fractions, mine)
    if seed is None:
        print(f"[demo] {dest.name}: {len(patients)} patient(s), too few for three splits")
    return seed


def verify_all(d: Demo, shards: dict[str, Path]) -> None:
    from medfm.shards import verify

    with d.stage("verify") as row:
        files = rows = 0
        for root in shards.values():
            report = verify(str(root))
            if not report.ok:
                raise SystemExit(f"demo: {root} failed verification:\n" + "\n".join(report.errors))
            files, rows = files + report.files_checked, rows + report.rows_checked
            d.commands.append(f"medfm shards verify {root}")
        row.items = f"{rows} rows"
        row.metric = f"{len(shards)} shard sets, {files} files re-hashed, 0 errors"
        d.results["verified"] = sorted(str(p) for p in shards.values())


def last_loss(run: Path, column: str = "train/loss") -> float:
    with (run / "logs" / "version_0" / "metrics.csv").open() as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return float(np.mean(values[-5:]))


def pretrain(d: Demo, name: str, tree: dict[str, Any], section: str = "Pretraining") -> Path:
    """One `medfm pretrain` run from its written config, its PNGs under `section`; returns the
    export folder."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.train import run

    path = d.config(f"pretrain_{name}", tree, "medfm pretrain --config {}")
    with d.stage(f"pretrain {name}") as row:
        cfg = load_config(path)
        summary = d.cluster.pretrain(name, cfg) if d.cluster else run(cfg)
        out = Path(tree["out_dir"])
        rate = summary["throughput"].get("samples_per_s", 0.0)
        row.items = f"{summary['steps']} steps"
        row.metric = f"loss {last_loss(out):.4f}, {rate:.0f} samples/s"
    plots = out / "plots"
    d.figure(section, f"{name}: training loss", plots / "loss.png")
    previews = sorted(plots.glob("*_step*.png"))  # the objective's preview at each checkpoint
    if previews:
        d.figure(section, f"{name}: {PREVIEWS[tree['objectives'][0]['name']]}", previews[-1])
    return out / "export"


def synth(d: Demo, model: Path, real: Path, encoder: Path) -> None:
    from medfm.models.diffusion.sampling import SamplerSettings
    from medfm.synth.audit import audit, load_audit_config
    from medfm.synth.generate import GenerateOptions, generate

    out = d.out / "synth" / "pneumonia"
    n, steps = d.scale.synth_n, d.scale.sampler_steps
    with d.stage("synth generate") as row:
        opts = GenerateOptions(n=n, sampler=SamplerSettings("ddim", steps), overwrite=True)
        header = generate(str(model), str(out), opts)
        row.items = f"{header['num_samples']} images"
        row.metric = f"DDIM {steps} steps, seeds 0..{n - 1}"
    d.commands.append(
        f"medfm synth generate --model {model} --n {n} --steps {steps} --out {out} --overwrite"
    )
    cmd = f"medfm synth audit --synthetic {out} --real {real} --config {{}}"
    path = d.config("synth_audit", dc.audit_config(encoder), cmd)
    with d.stage("synth audit") as row:
        report = audit(str(out), str(real), str(out / "audit"), load_audit_config(path))
        f, mem = report["fidelity"], report["memorization"]
        row.items = f"{report['counts']['synthetic']} vs {report['counts']['real_train']} real"
        row.metric = (f"{report['verdict']}: precision {f['precision']:.2f}, coverage "
                      f"{f['coverage']:.2f}, {mem['flagged']} flagged as memorized")  # fmt: skip
    d.results["audit"] = {"verdict": report["verdict"], "checks": report["checks"]}
    d.figure("Synthetic data", "synthetic samples, similarity histograms, checks",
             out / "audit" / "report.png")  # fmt: skip
    d.figure("Synthetic data", "closest synthetic/real pairs", out / "audit" / "closest_pairs.png")


def finetune(d: Demo, encoder: Path, shards: Path) -> None:
    from medfm.finetune import load_config, run
    from medfm.finetune.evaluate import evaluate_export

    run_dir = d.out / "runs" / "lora"
    tree = dc.finetune_config(encoder, shards, run_dir, d.scale)
    path = d.config("finetune_lora", tree, "medfm finetune --config {}")
    with d.stage("finetune lora") as row:
        cfg = load_config(path)
        d.cluster.finetune("finetune lora", cfg) if d.cluster else run(cfg)
        fit = json.loads((run_dir / "run.json").read_text())["fit"]
        test = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        row.items = f"{fit['counts']['train_rows']} train images"
        row.metric = (f"best val AUROC {fit['best_val_score']:.3f} (epoch {fit['best_epoch']}), "
                      f"test accuracy {test['accuracy']['value']:.3f}")  # fmt: skip
    with d.stage("export + hub") as row:
        pulled, rev, files = publish(d, run_dir, "pneumonia-lora", HUB_REPO)
        row.items = f"{files} files"
        row.metric = f"{HUB_REPO} -> {rev[:12]}, pulled and sha256-verified"
    roc = d.out / "runs" / "roc_pulled.png"
    with d.stage("evaluate pulled export") as row:
        m = evaluate_export(pulled, load_config(path), "test", roc)
        auroc = m["auroc"]
        same = "same as" if auroc["value"] == test["auroc"]["value"] else "differs from"
        row.items = f"{m['n']} test images"
        row.metric = (f"AUROC {auroc['value']:.3f} [{auroc['ci_low']:.3f}, "
                      f"{auroc['ci_high']:.3f}] (95% CI), {same} the run's")  # fmt: skip
    d.commands.append(f"medfm finetune evaluate {pulled} --config {path} --roc {roc}")
    d.results["evaluation"] = {"export": str(pulled), "auroc": auroc["value"], "n": m["n"]}
    d.figure("Fine-tuning", "ROC of the pulled export on the test split", roc)


def publish(d: Demo, run_dir: Path, name: str, repo: str) -> tuple[Path, str, int]:
    """Export a fine-tuning run, push it to the demo's hub and pull it back, sha256-verified:
    (the pulled folder, the pushed revision, the files pulled); their commands are listed."""
    from medfm.finetune import hub
    from medfm.finetune.export import export  # the package's lazy `export` may be shadowed

    hub_root = d.out / "hub"
    exported, pulled = d.out / "exports" / name, d.out / "pulled" / name
    export(run_dir, exported, overwrite=True)
    rev = hub.push(exported, repo, hub=str(hub_root))
    report = hub.pull(repo, pulled, hub=str(hub_root))
    d.commands += [
        f"medfm finetune export {run_dir} --out {exported} --overwrite",
        f"medfm hub push {exported} {repo} --hub {hub_root}",
        f"medfm hub pull {repo} --to {pulled} --hub {hub_root}",
    ]
    return pulled, rev, len(report.files)


def _ci(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def volumes(d: Demo, shards: Path) -> None:
    """A 3D MAE on the CT/MR volumes, then liver segmentation on the TotalSegmentator CT."""
    tree = dc.mae3d_config(shards, d.out / "runs" / "mae3d", d.scale)
    encoder = pretrain(d, "mae3d", tree, section=SEG_SECTION)
    if not d.inputs.sample_file("totalsegmentator/example_seg.nii.gz"):
        why = d.inputs.missing("totalsegmentator/example_seg.nii.gz")
        d.skip("segment liver 3D", f"needs the TotalSegmentator CT and its labels ({why})")
        return
    segment(d, encoder, shards)


def segment(d: Demo, encoder: Path, shards: Path) -> None:
    """UNETR on the 3D MAE, trained on the CT's train slab; exported, pushed to the hub and
    pulled back; the pulled export scored on the test slab (it never saw a voxel of it)."""
    from medfm.finetune import load_config, run
    from medfm.finetune.evaluate import evaluate_export

    run_dir = d.out / "runs" / "liver"
    overlay = d.out / "runs" / "liver_overlay_pulled.png"
    tree = dc.segmentation_config(encoder, shards, run_dir, d.scale)
    path = d.config("finetune_liver", tree, "medfm finetune --config {}")
    with d.stage("segment liver 3D") as row:
        cfg = load_config(path)
        d.cluster.finetune("segment liver 3D", cfg) if d.cluster else run(cfg)
        fit = json.loads((run_dir / "run.json").read_text())["fit"]
        run_dice = json.loads((run_dir / "metrics.json").read_text())["metrics"]["dice"]
        pulled, rev, files = publish(d, run_dir, "liver-unetr", SEG_REPO)
        m = evaluate_export(pulled, load_config(path), "test", overlay)
        (slabs,) = fit["slabs"].values()  # one CT
        same = "same as" if m["dice"]["value"] == run_dice["value"] else "differs from"
        row.items = f"{fit['counts']['train_samples']} CT, {len(fit['history'])} epochs"
        row.metric = (f"pulled export's test-slab Dice {_ci(m['dice'])} (95% CI over {m['n']} "
                      f"blocks of one CT), {same} the run's; {SEG_REPO} -> {rev[:12]}")  # fmt: skip
    d.commands.append(f"medfm finetune evaluate {pulled} --config {path} --roc {overlay}")
    d.results["segmentation"] = {
        "export": str(pulled), "hub": {"repo": SEG_REPO, "revision": rev, "files": files},
        "dice": m["dice"], "hd95": m["hd95"], "nsd": m["nsd"], "n_blocks": m["n"],
        "run_dice": run_dice["value"], "slabs": slabs, "epochs": len(fit["history"]),
    }  # fmt: skip
    d.figure(SEG_SECTION, "liver: CT, ground truth and the pulled export's prediction on "
             "axial slices of the test slab", overlay)  # fmt: skip


def ecg(d: Demo, shards: Path) -> None:
    """1D MAE on the MIT-BIH windows, then a probe for normal vs non-normal beats on them."""
    from medfm.finetune.encoder import load_base_encoder
    from medfm.shards import Manifest

    from .probes import ecg_beats, evaluate

    splits = {r["split"] for r in Manifest.open(str(shards)).rows() if r["dataset"] == "mitdb"}
    if not splits:
        for name in ("pretrain mae1d", "probe ecg beats"):
            d.skip(name, f"needs the MIT-BIH record ({d.inputs.missing('wfdb/100.hea')})")
        return
    (split,) = splits  # one record, one patient
    tree = dc.mae1d_config(shards, split, d.out / "runs" / "mae1d", d.scale)
    export = pretrain(d, "mae1d", tree, section=ECG_SECTION)
    roc = d.out / "runs" / "roc_ecg_beats.png"
    with d.stage("probe ecg beats") as row:
        base = load_base_encoder(str(export))
        m = evaluate(
            ecg_beats(shards, base.encoder.eval(), base.preprocessing), roc, d.scale.bootstrap
        )
        c = m["counts"]
        row.items = f"{c['train'] + c['test']} beats"
        row.metric = (f"test AUROC {_ci(m['auroc'])} (95% CI; {c['test']} test beats, "
                      f"{c['test_positive']} non-normal, later in time than the {c['train']} "
                      f"train beats), balanced accuracy {_ci(m['balanced_accuracy'])}")  # fmt: skip
    d.results["ecg_beats"] = m
    d.figure(ECG_SECTION, "ROC of the beat probe on the record's last 40% (time split)", roc)


def ehr(d: Demo, shards: Path | None) -> None:
    """Masked-code pretraining on the MIMIC-IV demo, then a 30-day readmission probe."""
    from medfm.finetune.encoder import load_base_encoder

    from .probes import ehr_discharges, evaluate

    if shards is None:
        for name in ("pretrain mcm", "probe ehr readmission"):
            d.skip(name, f"needs the MIMIC-IV demo ({d.inputs.missing('mimic-iv-demo-2.2')})")
        return
    export = pretrain(d, "mcm", dc.mcm_config(shards, d.out / "runs" / "mcm", d.scale), EHR_SECTION)
    roc = d.out / "runs" / "roc_ehr_readmission.png"
    with d.stage("probe ehr readmission") as row:
        ps, n = ehr_discharges(shards, load_base_encoder(str(export)).encoder.eval())
        m = evaluate(ps, roc, d.scale.bootstrap)
        c = m["counts"]
        row.items = f"{n['discharges']} discharges"
        row.metric = (f"test AUROC {_ci(m['auroc'])} (95% CI; {c['test']} discharges of "
                      f"{c['test_clusters']} held-out patients, {c['test_positive']} readmitted "
                      "within 30 days: ~100 patients, a wide interval)")  # fmt: skip
    d.results["ehr_readmission"] = m | {"n": n}
    d.figure(EHR_SECTION, "ROC of the 30-day readmission probe on held-out patients", roc)
