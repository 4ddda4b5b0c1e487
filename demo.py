"""`medfm demo`: the main job end to end on embedded defaults and real pip-shipped data.

Today it writes one shard set with every sample kind from real files that pip packages ship
(pydicom's CT/MR slices and 12-lead ECG, nibabel's NIfTI volumes), verifies it and prints a
summary. Later stages append themselves here as they land.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from medfm.shards import Geometry, Manifest, Sample, ShardSetWriter, verify
from medfm.shards.summary import stats

# A fixed key is fine here: the demo inputs are public test files. Real jobs take their key from
# the environment (see docs/ingest.md).
DEMO_KEY = b"medfm-demo-not-secret"


def pseudonym(value: str) -> str:
    return hashlib.blake2b(value.encode(), key=DEMO_KEY, digest_size=8).hexdigest()


def split_of(patient: str) -> str:
    bucket = int(pseudonym("split:" + patient), 16) % 10
    return "train" if bucket < 8 else "val" if bucket < 9 else "test"


def dicom_samples() -> list[Sample]:
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0)
        )
        patient = pseudonym(str(ds.PatientID))
        out.append(
            Sample(
                key=f"dcm-{pseudonym(name)}",
                kind="image2d",
                modality=ds.Modality,
                dataset="pydicom",
                patient_id=patient,
                split=split_of(patient),
                data=np.round(pixels).astype(np.int16),
                spacing=tuple(float(s) for s in ds.PixelSpacing),
                licence="MIT (pydicom test data)",
                provenance={"source": f"pydicom:{name}"},
            )
        )
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    group = ds.WaveformSequence[0]
    leads = [c.ChannelSourceSequence[0].CodeMeaning for c in group.ChannelDefinitionSequence]
    patient = pseudonym(str(ds.PatientID))
    out.append(
        Sample(
            key=f"ecg-{pseudonym('waveform_ecg')}",
            kind="signal",
            modality="ECG",
            dataset="pydicom",
            patient_id=patient,
            split=split_of(patient),
            data=ds.waveform_array(0).T.astype(np.float32),
            sampling_rate=float(group.SamplingFrequency),
            channels=leads,
            licence="MIT (pydicom test data)",
            provenance={"source": "pydicom:waveform_ecg.dcm"},
        )
    )
    return out


def nifti_samples() -> list[Sample]:
    import nibabel as nib

    data_dir = Path(nib.__file__).parent / "tests" / "data"
    out = []
    for name in ("anatomical.nii", "standard.nii.gz"):
        img = nib.load(data_dir / name)
        out.append(
            Sample(
                key=f"nii-{pseudonym(name)}",
                kind="volume3d",
                modality="MR",
                dataset="nibabel",
                patient_id=pseudonym(name),
                split=split_of(name),
                data=np.asarray(img.dataobj),
                geometry=Geometry.from_nifti_affine(img.affine),
                licence="MIT (nibabel test data)",
                provenance={"source": f"nibabel:{name}"},
            )
        )
    return out


def run_demo(out: str, overwrite: bool = True) -> dict:
    """Write, verify and summarise the demo shard set; returns the stats."""
    t0 = time.perf_counter()
    root = os.path.join(out, "shards")
    samples = dicom_samples() + nifti_samples()
    with ShardSetWriter(root, overwrite=overwrite) as writer:
        for sample in samples:
            writer.write(sample)
    t_write = time.perf_counter() - t0
    report = verify(root)
    if not report.ok:
        raise SystemExit("demo: verification failed:\n" + "\n".join(report.errors))
    s = stats(Manifest.open(root))
    t_total = time.perf_counter() - t0
    print(f"{'stage':<10}{'wall s':>8}{'items':>8}  key metric")
    print(f"{'ingest':<10}{t_write:>8.2f}{s['samples']:>8}  {s['file_bytes'] / 1e3:.0f} kB written")
    print(
        f"{'verify':<10}{t_total - t_write:>8.2f}{report.rows_checked:>8}  "
        f"{report.files_checked} files re-hashed, 0 errors"
    )
    print(f"kinds: {s['by_kind']}  splits: {s['by_split']}")
    print(f"shard set: {root}")
    return s
