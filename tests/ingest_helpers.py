"""Shared helpers for the ingest tests: real test files, a DICOM series writer, in-process reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.registry import IngestError, Quarantine, ReadContext, create_reader
from medfm.ingest.sources import attach_labels, list_files, pair_labels

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(__import__("nibabel").__file__).parent / "tests" / "data"
KEY = b"3f9a61c0d7e24b8f95a0c6e1b2d47f38a9e05c1d6b7f24e8c3a19d50f6b2e7c4"  # random, public


def sample_data() -> Path | None:
    p = os.environ.get("MEDFM_SAMPLE_DATA")
    return Path(p) if p and Path(p, "totalsegmentator").is_dir() else None


def read_all(spec_dict: dict[str, Any], key: bytes = KEY) -> list[tuple[str, str, Any]]:
    """Discover and read every source in-process (no Ray): [("S"|"Q", rel, sample|reason)]."""
    spec = parse_spec(spec_dict)
    kr = Keyring(key)
    out: list[tuple[str, str, Any]] = []
    for src in spec.sources:
        fs, files, skipped = list_files(src)
        files, labels = pair_labels(src, files, fs)
        out += [("Q", q.rel, q.reason) for q in skipped + labels.quarantine]
        reader = create_reader(src.format)
        ctx = ReadContext(fs, src, spec, kr)
        scans = {f.rel: reader.scan(f, ctx) for f in files}
        items = []
        for item in reader.group(files, scans, src):
            if isinstance(item, Quarantine):
                out.append(("Q", item.rel, item.reason))
            else:
                items.append(item)
        out += [("Q", q.rel, q.reason) for q in attach_labels(labels, items, src.name)]
        for item in items:
            try:
                for s in reader.read(item, ReadContext(fs, src, spec, kr, {}, item)):
                    out.append(("S", item.rel, s))
            except IngestError as e:
                out.append(("Q", item.rel, f"{type(e).__name__}: {e}"))
    return out


def one_sample(spec_dict: dict[str, Any]):
    got = read_all(spec_dict)
    assert len(got) == 1 and got[0][0] == "S", got
    return got[0][2]


def write_series(
    img: sitk.Image,
    folder: Path,
    *,
    patient: str = "PAT-1",
    series_uid: str | None = None,
    phi: dict[str, Any] | None = None,
    names: list[str] | None = None,
    tilt_mm: float = 0.0,
) -> list[Path]:
    """Write a 3D sitk image (HU) as a CT DICOM series, one file per slice (k)."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(img).astype(np.int32)  # (K, J, I)
    d = np.array(img.GetDirection()).reshape(3, 3)
    study, series = generate_uid(), series_uid or generate_uid()
    paths = []
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = patient, "Doe^Jane", "CT"
        ds.StudyDate = "20200101"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        sx, sy, sz = img.GetSpacing()
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.SliceThickness = f"{sz:.6g}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        pos = np.array(img.TransformIndexToPhysicalPoint((0, 0, k))) + d[:, 0] * tilt_mm * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.clip(arr[k] + 1024, 0, 65535).astype("<u2").tobytes()
        for kw, value in (phi or {}).items():
            setattr(ds, kw, value)
        p = folder / (names[k] if names else f"slice{k:03d}.dcm")
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def small_ct() -> sitk.Image:
    """A real volume: nibabel's anatomical.nii (33x41x25 MR, 2 mm), used as HU-like ints."""
    return sitk.Cast(sitk.ReadImage(str(NIBABEL_FILES / "anatomical.nii")), sitk.sitkInt16)


def centroids_mm(label: np.ndarray, affine: np.ndarray, min_voxels: int = 50) -> dict[int, Any]:
    """Label centroids in world mm from an (I, J, K) label array and its voxel->world affine."""
    out = {}
    for v in np.unique(label):
        if v == 0:
            continue
        idx = np.argwhere(label == v)
        if len(idx) >= min_voxels:
            c = idx.mean(axis=0)
            out[int(v)] = affine[:3, :3] @ c + affine[:3, 3]
    return out


def read_items(spec_dict: dict[str, Any]) -> tuple[list, list[tuple[str, str, Any]]]:
    """(items, [("S", rel, sample) | ("Q", rel, reason)]) of every source, read in-process (no
    Ray) with each source's reader options; a reader may yield a Quarantine for part of an item
    (a bad signal window) as well as raise for the whole."""
    spec = parse_spec(spec_dict)
    kr, items, out = Keyring(KEY), [], []
    for s in spec.sources:
        fs, files, _ = list_files(s)
        reader = create_reader(s.format, **s.options)
        ctx = ReadContext(fs, s, spec, kr)
        scans = {f.rel: reader.scan(f, ctx) for f in files}
        for item in reader.group(files, scans, s):
            if isinstance(item, Quarantine):
                out.append(("Q", item.rel, item.reason))
                continue
            items.append(item)
            try:
                for o in reader.read(item, ReadContext(fs, s, spec, kr, {}, item)):
                    bad = isinstance(o, Quarantine)
                    out.append(("Q", item.rel, o.reason) if bad else ("S", item.rel, o))
            except IngestError as e:
                out.append(("Q", item.rel, str(e)))
    return items, out
