"""The demo's inputs and the specs/configs it writes to `<out>/configs/` and then runs.

Everything here is plain data for the stages' own loaders (`medfm ingest` specs, `medfm pretrain`
and `medfm finetune` configs, the `medfm synth audit` config), so that a user can edit a YAML
file and rerun one stage on its own. Paths are absolute: the pretrain and finetune loaders read
relative paths against the working directory, ingest against the spec's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medfm.io import write_text


@dataclass(frozen=True)
class Scale:
    """Sizes and step counts: FULL for `medfm demo`, QUICK for `--quick` (the test)."""

    xrays: int  # PneumoniaMNIST images staged as PNGs (0 = all 5,856)
    mae_steps: int
    diffusion_steps: int
    synth_n: int  # synthetic images generated and audited
    sampler_steps: int
    finetune_epochs: int
    bootstrap: int  # patient-level resamples for the confidence intervals
    ecg_steps: int  # 1D MAE on the MIT-BIH windows
    ehr_steps: int  # masked-code modeling on the MIMIC-IV demo
    mae3d_steps: int  # 3D MAE on the CT/MR volumes
    seg_epochs: int  # liver segmentation on the CT's train slab


FULL = Scale(0, 400, 300, 256, 25, 2, 500, 200, 200, 300, 20)
QUICK = Scale(600, 30, 20, 24, 4, 1, 50, 10, 10, 10, 2)


@dataclass(frozen=True)
class Inputs:
    """Where the real data lives: pip-shipped test files always, MEDFM_SAMPLE_DATA if set."""

    pydicom: Path
    nibabel: Path
    sample: Path | None

    @classmethod
    def find(cls) -> Inputs:
        import nibabel
        import pydicom

        root = os.environ.get("MEDFM_SAMPLE_DATA")
        sample = Path(root).resolve() if root and Path(root).is_dir() else None
        return cls(
            Path(pydicom.__file__).parent / "data" / "test_files",
            Path(nibabel.__file__).parent / "tests" / "data",
            sample,
        )

    def sample_file(self, rel: str) -> Path | None:
        """`rel` under MEDFM_SAMPLE_DATA, or None when the variable is unset or it is missing."""
        p = self.sample / rel if self.sample else None
        return p if p is not None and p.exists() else None

    def missing(self, rel: str) -> str:
        if self.sample is None:
            return "MEDFM_SAMPLE_DATA is unset"
        return f"{self.sample / rel} is missing"


XRAY_NPZ = "pneumoniamnist/pneumoniamnist.npz"
LABEL_NAMES = ["normal", "pneumonia"]


def stage_xrays(npz: Path, dest: Path, limit: int) -> int:
    """Write PneumoniaMNIST as a user's data would arrive: PNG files plus a labels CSV.

    MedMNIST ships no patient ids, so each image is its own patient; ingest re-splits them by
    keyed pseudonym (80/10/10), so the official split sizes are not kept. `limit` takes an even
    share of each official split. Rewritten on every run (a few seconds), so it never goes stale.
    """
    from PIL import Image

    arrays = np.load(npz)
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for old in images_dir.glob("*.png"):
        old.unlink()
    total = sum(len(arrays[f"{s}_labels"]) for s in ("train", "val", "test"))
    lines = ["image_id,patient_id,label"]
    for split in ("train", "val", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0]
        n = len(images) if not limit else max(2, round(limit * len(images) / total))
        for i in range(n):
            name = f"{split}_{i:05d}"
            Image.fromarray(images[i]).save(images_dir / f"{name}.png")
            lines.append(f"{name},pneumoniamnist-{name},{int(labels[i])}")
    write_text(dest / "labels.csv", "\n".join(lines) + "\n")
    return len(lines) - 1


def _dicom_sources(inputs: Inputs) -> list[dict[str, Any]]:
    pd = str(inputs.pydicom)
    return [
        {"name": "pydicom_ct", "root": pd, "include": ["CT_small.dcm"], "format": "dicom",
         "licence": "MIT (pydicom test data)"},
        {"name": "pydicom_mr", "root": pd, "include": ["MR_small.dcm"], "format": "dicom",
         "licence": "MIT (pydicom test data)"},
        # Three patients' CT/MR series and CR images; 77654033/CT2 lacks a slice and is
        # quarantined, which the demo shows on purpose.
        {"name": "pydicom_series", "root": f"{pd}/dicomdirtests", "format": "dicom",
         "include": ["77654033/**", "98892001/**", "98892003/**"],
         "licence": "MIT (pydicom test data)"},
    ]  # fmt: skip


def imaging_spec(inputs: Inputs, key_file: Path) -> dict[str, Any]:
    sources = _dicom_sources(inputs)
    sources.append(
        {"name": "nibabel", "root": str(inputs.nibabel), "format": "nifti", "modality": "MR",
         "include": ["anatomical.nii", "example4d.nii.gz"], "licence": "MIT (nibabel test data)"}
    )  # fmt: skip
    ts = inputs.sample_file("totalsegmentator")
    if ts:
        # TotalSegmentator names its label maps example_seg*.nii.gz rather than after the
        # image: `{stem}/..` cancels the image's stem, leaving the label map's own name.
        for name, image, seg, modality in (
            ("totalseg_ct", "example_ct_sm", "example_seg", "CT"),
            ("totalseg_mr", "example_mr_sm", "example_seg_mr", "MR"),
        ):
            sources.append(
                {"name": name, "root": str(ts), "format": "nifti", "modality": modality,
                 "include": [f"{image}.nii.gz"], "label": f"{{stem}}/../{seg}.nii.gz",
                 "licence": "Apache-2.0 (TotalSegmentator test data)"}
            )  # fmt: skip
    return {
        "sources": sources,
        "volume": {"orientation": "LPS", "spacing": None},  # native grid: no interpolation
        "intensity": {"ct": "raw", "mr": "zscore"},
        "shards": {"task_items": 4, "chunks": [64, 64, 64]},
        "deid": {"key_file": str(key_file)},
    }


def ecg_spec(inputs: Inputs, key_file: Path) -> dict[str, Any]:
    sources = [
        {"name": "pydicom_ecg", "root": str(inputs.pydicom), "include": ["waveform_ecg.dcm"],
         "format": "dicom_waveform", "licence": "MIT (pydicom test data)"}
    ]  # fmt: skip
    # One patient per record (its stem): with pydicom's, four patients, enough for a train, a
    # val and a test patient (see `stages.split_seed`).
    wfdb = inputs.sample_file("wfdb")
    for name, rel, options, licence in (
        ("mitdb", "100.hea", {"annotators": ["atr"]}, "ODC-By-1.0 (PhysioNet MIT-BIH)"),
        ("ptbdb", "s0010_re.hea", {}, "ODC-By-1.0 (PhysioNet PTB)"),
        ("multisegment", "041s/041s.hea", {}, "ODC-By-1.0 (PhysioNet, via wfdb-python)"),
    ):
        if wfdb and (wfdb / rel).is_file():
            sources.append(
                {"name": name, "root": str(wfdb), "include": [rel],
                 "format": "wfdb", "patient_id": {"from": "stem"}, "options": options,
                 "licence": licence}
            )  # fmt: skip
    return {
        "sources": sources,
        "signal": {"target_rate": 500, "window_s": 10, "groups": ["ecg"]},
        "shards": {"task_items": 4},
        "deid": {"key_file": str(key_file)},
    }


def ehr_spec(mimic: Path, key_file: Path) -> dict[str, Any]:
    return {
        "sources": [
            {
                "name": "mimic",
                "root": str(mimic),
                "include": ["hosp/*.csv.gz", "icu/*.csv.gz"],
                "format": "mimic_iv",
                "options": {"sample_per": "patient", "buckets": 2},
                "licence": "ODbL-1.0 (MIMIC-IV demo v2.2)",
            }
        ],
        "shards": {"task_items": 1},  # one patient bucket per Ray task
        "deid": {"key_file": str(key_file)},
    }


def xray_spec(staged: Path, key_file: Path) -> dict[str, Any]:
    return {
        "sources": [
            {
                "name": "pneumoniamnist",
                "root": str(staged),
                "include": ["images/*.png"],
                "format": "png",
                "modality": "CR",
                "labels_table": {
                    "path": str(staged / "labels.csv"),
                    "key": "image_id",
                    "columns": ["label"],
                },
                "patient_id": {"from": "table"},
                "licence": "CC BY 4.0 (MedMNIST v2)",
            }
        ],
        "shards": {"task_items": 512},
        "deid": {"key_file": str(key_file)},
    }


# A ViT small enough for a 2-core CPU: 4 px patches on 28 px images give 49 tokens.
VIT2D = {"name": "vit2d", "size": "tiny", "img_size": 28, "patch_size": 4, "in_chans": 1,
         "embed_dim": 64, "depth": 4, "num_heads": 4}  # fmt: skip
# Isotropic 4-voxel patches (the UNETR head needs them) on a patch thin along j, the axis the
# CT's segmentation slabs are cut along: 8 x 2 x 8 = 128 tokens.
VIT3D = {"name": "vit3d", "size": "tiny", "img_size": [32, 8, 32], "patch_size": [4, 4, 4],
         "embed_dim": 64, "depth": 2, "num_heads": 4}  # fmt: skip


def _train(steps: int, lr: float, plots: int) -> dict[str, Any]:
    every = max(1, steps // plots)
    return {"max_steps": steps, "lr": lr, "warmup_steps": max(1, steps // 20),
            "checkpoint_every": every, "log_every": max(1, min(10, steps // 10)),
            "loggers": ["csv"], "plots": True}  # fmt: skip


def mae2d_config(shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    return {
        "name": "demo-mae2d",
        "out_dir": str(run),
        "data": {"shards": str(shards), "split": "train", "kinds": ["image2d"],
                 "batch_size": 64, "num_workers": 0, "intensity": "auto"},
        "model": VIT2D,
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "decoder_dim": 64,
                        "decoder_depth": 1, "decoder_heads": 4}],
        "train": _train(s.mae_steps, 1.5e-3, plots=3),
    }  # fmt: skip


# The datasets a pretraining stage filters on, by ingest set: each needs a train patient.
TRAIN_ALONE = {"imaging": ("nibabel", "totalseg_ct", "totalseg_mr")}


def mae3d_config(shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    """A 3D MAE on the MR volumes nibabel ships and the TotalSegmentator CT and MR (their
    train patients: `stages.reseed` puts each of the three in train)."""
    return {
        "name": "demo-mae3d",
        "out_dir": str(run),
        "data": {"shards": str(shards), "split": "train", "kinds": ["volume3d"],
                 "datasets": list(TRAIN_ALONE["imaging"]), "batch_size": 8, "num_workers": 0,
                 "patches_per_volume": 16},
        "model": VIT3D,
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "decoder_dim": 64,
                        "decoder_depth": 1, "decoder_heads": 4}],
        "train": _train(s.mae3d_steps, 1.5e-3, plots=3),
    }  # fmt: skip


# 10 s at 500 Hz in 100 ms patches: 2 leads x 100 time steps = 200 tokens.
SIGNAL_VIT = {"name": "signal_vit", "size": "tiny", "num_leads": 2, "length": 5000,
              "patch_size": 50, "embed_dim": 64, "depth": 2, "num_heads": 4}  # fmt: skip
# vocab_size comes from the shard set's vocabulary (see pretrain.data.set_vocab_size).
EHR_MODEL = {"name": "ehr_transformer", "size": "tiny", "max_tokens": 256, "embed_dim": 64,
             "depth": 2, "num_heads": 4}  # fmt: skip


def mae1d_config(shards: Path, split: str, run: Path, s: Scale) -> dict[str, Any]:
    """The MIT-BIH windows only: the other ECG records have 12 or 15 leads, and one encoder
    takes one lead count. `split` is the one the record's patient landed in (one patient, so
    one split): the MAE is label-free, the beat probe splits the record in time itself."""
    return {
        "name": "demo-mae1d-ecg",
        "out_dir": str(run),
        "data": {"shards": str(shards), "split": split, "kinds": ["signal"],
                 "datasets": ["mitdb"], "batch_size": 16, "num_workers": 0},
        "model": SIGNAL_VIT,
        "objectives": [{"name": "mae", "mask_ratio": 0.75, "decoder_dim": 64,
                        "decoder_depth": 1, "decoder_heads": 4}],
        "train": _train(s.ecg_steps, 1.5e-3, plots=1),
    }  # fmt: skip


def mcm_config(shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    """BERT-style masked codes on random 256-token windows of the train patients' records."""
    return {
        "name": "demo-mcm-ehr",
        "out_dir": str(run),
        "data": {"shards": str(shards), "split": "train", "kinds": ["ehr"], "batch_size": 16,
                 "num_workers": 0, "max_tokens": EHR_MODEL["max_tokens"]},
        "model": EHR_MODEL,
        "objectives": [{"name": "mcm", "mask_ratio": 0.15}],
        "train": _train(s.ehr_steps, 1.5e-3, plots=1),
    }  # fmt: skip


def diffusion_config(shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    """A class-conditional DDPM (normal / pneumonia) through the pretrain engine. v-prediction:
    after 150 CPU steps, epsilon-prediction gave pure-noise DDIM samples (every one of 64, with
    a cosine or a linear schedule) where v gave 9%. The EMA decay is short because the run is:
    0.999 would still hold most of the first steps' weights."""
    return {
        "name": "demo-diffusion2d",
        "out_dir": str(run),
        "data": {"shards": str(shards), "split": "train", "kinds": ["image2d"],
                 "class_key": "label", "batch_size": 32, "num_workers": 0, "intensity": "auto"},
        "objectives": [{"name": "diffusion", "spatial_dims": 2, "sample_size": [28, 28],
                        "channels": [8, 16, 16], "attention_levels": [False, False, False],
                        "layers_per_block": 2, "norm_num_groups": 8, "num_classes": 2,
                        "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}],
        "train": {**_train(s.diffusion_steps, 3e-3, plots=1), "weight_decay": 0.0,
                  "ema_decay": 0.99},
    }  # fmt: skip


def audit_config(encoder: Path) -> dict[str, Any]:
    """The shipped thresholds, with our MAE encoder as the feature space."""
    from medfm.synth.audit import DEFAULT_CONFIG

    tree = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return tree | {"encoder": str(encoder), "msssim_pairs": 200}


def finetune_config(encoder: Path, shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    return {
        "name": "demo-pneumonia-lora",
        "out_dir": str(run),
        "encoder": str(encoder),
        "mode": "lora",
        "data": {"shards": str(shards), "datasets": ["pneumoniamnist"], "batch_size": 64},
        "task": {"type": "binary", "label_key": "label", "label_names": LABEL_NAMES},
        "lora": {"rank": 8, "alpha": 16},
        "train": {"epochs": s.finetune_epochs, "lr": 5e-3, "seed": 0},
        # Accuracy, sensitivity, ... at the threshold that maximises Youden's J on val.
        "eval": {"bootstrap": s.bootstrap, "threshold": "val_youden"},
    }


SEG_LABELS = {"background": 0, "liver": 5}  # TotalSegmentator v1's label values
# Slabs of the CT along j (anterior to posterior, 101 voxels), in this order: the liver spans
# j 14..75, so test (j 0..25) and val (34..45) hold 12 of its slices each and train (54..100) the
# other 22. The gaps default to the patch's 8 voxels along j.
SEG_SLABS = {"test": 0.3, "val": 0.15, "train": 0.55}


def segmentation_config(encoder: Path, shards: Path, run: Path, s: Scale) -> dict[str, Any]:
    """Liver vs background on the TotalSegmentator CT from the 3D MAE, every encoder weight
    trained (UNETR head), its one labelled volume split into slabs."""
    return {
        "name": "demo-liver-unetr",
        "out_dir": str(run),
        "encoder": str(encoder),
        "mode": "full",
        "data": {"shards": str(shards), "datasets": ["totalseg_ct"], "batch_size": 8},
        "task": {"type": "segmentation", "label_names": list(SEG_LABELS),
                 "label_values": list(SEG_LABELS.values()), "overlap": 0.25,
                 "region_split": {"axis": 1, "slabs": SEG_SLABS, "blocks": 5, "blocks_axis": 2}},
        "train": {"epochs": s.seg_epochs, "lr": 3e-3, "patches_per_volume": 32, "seed": 0},
        "eval": {"bootstrap": s.bootstrap},
    }  # fmt: skip


def write_yaml(tree: dict[str, Any], path: Path, comment: str) -> Path:
    """The config as YAML, headed by how to run it on its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)
    write_text(path, f"# Written by `medfm demo`. {comment}\n{body}")
    return path
