"""`medfm demo`: the main job end to end, on embedded defaults (local Ray, local disk, a local hub
under the output folder) and real data only.

    ingest   pydicom/nibabel test files (+ TotalSegmentator CT/MR with label maps), ECG, MIMIC-IV
             demo, PneumoniaMNIST staged as PNGs + labels.csv -- all through `medfm ingest`
    verify   every shard set, re-hashed
    pretrain a small MAE on the chest X-rays
    synth    a tiny diffusion model, synthetic X-rays, their audit
    finetune LoRA on the pneumonia task, export, hub push, pull, evaluate the pulled export
    3D       a 3D MAE on the CT/MR volumes, UNETR liver segmentation on slabs of the CT, export,
             hub push, pull, Dice of the pulled export on the test slab
    ecg      a 1D MAE on the MIT-BIH windows, a probe for normal vs non-normal beats (time split)
    ehr      masked-code pretraining on the MIMIC-IV demo, a 30-day readmission probe (by patient)

Every spec and config is written to `<out>/configs/` first and the stage runs exactly that file,
so each stage can be rerun alone with the commands printed at the end. Data that is missing
(MEDFM_SAMPLE_DATA unset) skips the stages that need it, with a line saying why.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medfm.io import write_json, write_text

from . import configs as dc
from .cluster import DemoCluster, connect
from .report import print_table, write_report
from .stages import Demo, ecg, ehr, finetune, ingest, pretrain, synth, verify_all, volumes

# What a demo run writes (and a rerun replaces); the hub and the key are kept across runs.
OUTPUTS = ("configs", "staging", "shards", "runs", "synth", "exports", "pulled", "report.html",
           "summary.json")  # fmt: skip


def prepare(out: Path, overwrite: bool) -> Path:
    """Clear an earlier run's outputs (never anything else in `out`); returns the key file."""
    earlier = [n for n in OUTPUTS if (out / n).exists()]
    if earlier and not overwrite:
        raise SystemExit(f"demo: {out} holds an earlier demo's {earlier}; pass --overwrite")
    for name in earlier:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    key = out / "deid.key"  # kept across reruns: same key, same pseudonyms and splits
    if not key.is_file():
        write_text(key, os.urandom(32).hex() + "\n")
        key.chmod(0o600)
    return key


def compute_threads() -> int:
    """One compute thread per two cores unless OMP_NUM_THREADS says otherwise: on a 2-core box
    that also runs other jobs, two OpenMP threads spin-wait for each other and a tiny ViT step
    ran 10x slower than with one (measured)."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return torch.get_num_threads()


def quiet_libraries() -> None:
    """Keep medfm's progress lines readable: show the synth logger's INFO lines, drop
    Lightning's device banners and three warnings that ask nothing of a demo user."""
    import lightning.pytorch  # noqa: F401  (it sets its logger's level on import)

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    medfm_log = logging.getLogger("medfm")
    medfm_log.setLevel(logging.INFO)
    medfm_log.addHandler(handler)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*`srun` command is available", ".*isinstance\\(treespec, LeafSpec\\)",
                    ".*`IterableDataset` has `__len__` defined"):  # fmt: skip
        warnings.filterwarnings("ignore", message=message)


def run_demo(
    out: str, overwrite: bool = True, quick: bool = False, address: str | None = None
) -> dict[str, Any]:
    """Run every stage into `out`; prints the summary table and returns the summary. With
    `address`, on that Ray cluster (medfm/demo/cluster.py); `out` must be on shared storage."""
    t0 = time.perf_counter()
    with connect(address) as on_cluster:
        return _run(out, overwrite, quick, on_cluster, t0)


def _run(out: str, overwrite: bool, quick: bool, on_cluster: DemoCluster | None, t0: float):
    d = Demo(Path(out).resolve(), dc.QUICK if quick else dc.FULL, dc.Inputs.find())
    d.cluster = on_cluster
    quiet_libraries()
    key = prepare(d.out, overwrite)
    if on_cluster:
        on_cluster.check_shared(d.out)
        print(f"[demo] on the Ray cluster at {on_cluster.address}: {on_cluster.group.size} node(s)")
    where = d.inputs.sample or "unset: pip-shipped files only"
    print(f"[demo] output {d.out}; MEDFM_SAMPLE_DATA {where}; {compute_threads()} torch threads")
    shards = ingest(d, key)
    verify_all(d, shards)
    xray = shards.get("xray")
    if xray:
        encoder = pretrain(d, "mae2d", dc.mae2d_config(xray, d.out / "runs" / "mae2d", d.scale))
        tree = dc.diffusion_config(xray, d.out / "runs" / "diffusion", d.scale)
        model = pretrain(d, "diffusion", tree)
        synth(d, model, xray, encoder / "encoder.json")
        finetune(d, encoder, xray)
    else:
        reason = f"needs the PneumoniaMNIST chest X-rays ({d.inputs.missing(dc.XRAY_NPZ)})"
        for name in ("pretrain diffusion", "synth generate", "synth audit", "finetune lora",
                     "export + hub", "evaluate pulled export"):  # fmt: skip
            d.skip(name, reason)
    volumes(d, shards["imaging"])
    ecg(d, shards["ecg"])
    ehr(d, shards.get("ehr"))
    total = time.perf_counter() - t0
    summary = {
        "out": str(d.out),
        "quick": quick,
        "sample_data": str(d.inputs.sample or ""),
        "total_s": round(total, 1),
        "stages": [asdict(r) for r in d.rows],
        "commands": d.commands,
        **d.results,
        **({"cluster": on_cluster.record()} if on_cluster else {}),
    }
    write_report(d.out / "report.html", summary, d.figures)
    write_json(d.out / "summary.json", summary, indent=1, default=str)
    print_table(d.rows, total)
    print(f"\nreport: {d.out / 'report.html'}\n\nEach stage alone, with the same configs:")
    for cmd in d.commands:
        print(f"  {cmd}")
    return summary
