"""Small real shard sets for the reader tests, built from data that ships with nibabel/pydicom
and, when MEDFM_SAMPLE_DATA is set, TotalSegmentator CT and PneumoniaMNIST."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from medfm.shards import Geometry, Sample, ShardSetWriter

ANATOMICAL = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


def anatomical_slices() -> list[tuple[str, np.ndarray]]:
    """Every axial, coronal and sagittal slice of nibabel's anatomical.nii (a real T1 MR)."""
    vol = np.asarray(nibabel.load(ANATOMICAL).dataobj).astype(np.int16)
    out = []
    for axis, name in enumerate(("sag", "cor", "ax")):
        for i in range(vol.shape[axis]):
            out.append((f"anat-{name}{i:03d}", np.take(vol, i, axis=axis)))
    return out


def write_2d_set(root: Path, *, shard_max_bytes: int = 8192, dataset: str = "anat",
                 synthetic: bool = False, prefix: str = "") -> list[str]:  # fmt: skip
    """~100 real 2D samples (MR slices + pydicom's CT/MR) in many small tar shards."""
    samples = anatomical_slices()
    for f in ("CT_small.dcm", "MR_small.dcm"):
        samples.append((f"dcm-{f[:2].lower()}", pydicom.dcmread(get_testdata_file(f)).pixel_array))
    median = np.median([float(a.mean()) for _, a in samples])
    keys = []
    with ShardSetWriter(str(root), shard_max_bytes=shard_max_bytes) as w:
        for i, (key, arr) in enumerate(samples):
            key = f"{prefix}{key}"
            w.write(
                Sample(
                    key=key,
                    kind="image2d",
                    modality="CT" if "dcm-ct" in key else "MR",
                    dataset=dataset,
                    patient_id=f"pat{i % 7}",
                    split="val" if i % 5 == 4 else "train",
                    data=arr.astype(np.int16),
                    labels={"class": int(arr.mean() > median)},
                    synthetic=synthetic,
                    spacing=(1.0, 1.0),
                )
            )
            keys.append(key)
    return keys


def write_pneumonia_set(root: Path, sample_data: Path, n: int = 200) -> None:
    z = np.load(sample_data / "pneumoniamnist" / "pneumoniamnist.npz")
    with ShardSetWriter(str(root), shard_max_bytes=16384) as w:
        for i in range(n):
            w.write(
                Sample(
                    key=f"pm{i:05d}",
                    kind="image2d",
                    modality="CR",
                    dataset="pneumoniamnist",
                    patient_id=f"pm{i}",
                    split="train",
                    data=z["train_images"][i],
                    labels={"class": int(z["train_labels"][i][0])},
                )
            )


def load_ct(sample_data: Path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    d = sample_data / "totalsegmentator"
    ct = nibabel.load(d / "example_ct_sm.nii.gz")
    seg = np.asarray(nibabel.load(d / "example_seg.nii.gz").dataobj).astype(np.uint8)
    return np.asarray(ct.dataobj).astype(np.int16), seg, Geometry.from_nifti_affine(ct.affine)


def write_ct_set(root: Path, sample_data: Path, *, copies: int = 2,
                 chunks: tuple[int, int, int] = (16, 16, 16)) -> None:  # fmt: skip
    """The TotalSegmentator CT (122x101x30) and its segmentation, plus flipped copies."""
    img, seg, geometry = load_ct(sample_data)
    with ShardSetWriter(str(root), chunks=chunks) as w:
        for i in range(copies):
            flip = (slice(None, None, -1 if i % 2 else 1),)
            w.write(
                Sample(
                    key=f"ct{i}",
                    kind="volume3d",
                    modality="CT",
                    dataset="totalseg",
                    patient_id=f"ts{i}",
                    split="train",
                    data=np.ascontiguousarray(img[flip]),
                    label_map=np.ascontiguousarray(seg[flip]),
                    geometry=geometry,
                )
            )
