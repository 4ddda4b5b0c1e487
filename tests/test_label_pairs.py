"""Label maps in physical space and from pairing files, through a real ingest job (local Ray):
a TotalSegmentator segmentation on a flipped/permuted grid is aligned, a shifted one refused
with its distance in mm; `label_pairs` as a CSV (NIfTI and a DICOM series), a Medical
Segmentation Decathlon dataset.json and an nnU-Net v2 raw dataset; unusable labels are
quarantined with their reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from ingest_helpers import NIBABEL_FILES, PYDICOM_FILES, read_all

from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.shards import ShardSet, verify

CT, SEG = "example_ct_sm.nii.gz", "example_seg.nii.gz"
KEY = b"4f0fc4230292e66fa3a0f1f4846267c5d340f7c4db8b70c78acba3078cfc869e"  # tests only
SERIES = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"


def _lps(path: Path) -> np.ndarray:
    """What ingest stores without resampling: the map on LPS axes, (I, J, K)."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")).T


def _flipped(seg: Path, out: Path) -> None:
    """The same label map on a grid with y flipped and x/y swapped (RAS -> PRS): every voxel
    keeps its physical position, only the header and the voxel order change."""
    img = nib.load(seg)
    n = img.shape[1]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, n - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    data = np.asarray(img.dataobj)[:, ::-1, :].transpose(1, 0, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip @ swap), out)


def _shifted(seg: Path, out: Path, mm: float) -> None:
    img = nib.load(seg)
    affine = img.affine.copy()
    affine[0, 3] += mm
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), out)


def _series_with_label(root: Path) -> sitk.Image:
    """pydicom's 5-slice CT series, and a label map on its grid (flipped in z) beside it."""
    shutil.copytree(SERIES, root / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "series")))
    img = reader.Execute()
    label = sitk.Cast(img > float(np.median(sitk.GetArrayViewFromImage(img))), sitk.sitkUInt8)
    label = sitk.Flip(label, [False, False, True])  # same physical content, reversed slices
    sitk.WriteImage(label, str(root / "series_seg.nii.gz"))
    return label


def _layouts(base: Path, ts: Path) -> dict:
    ct, seg = ts / CT, ts / SEG
    # A. flipped, and truly shifted, label maps beside the image (the `label` pattern)
    for name in ("ref", "flip", "shift"):
        (base / name).mkdir(parents=True)
        shutil.copy(ct, base / name / "ct.nii.gz")
    shutil.copy(seg, base / "ref" / "ct_seg.nii.gz")
    _flipped(seg, base / "flip" / "ct_seg.nii.gz")
    _shifted(seg, base / "shift" / "ct_seg.nii.gz", 4.5)
    # B. an image,label CSV: a NIfTI, a DICOM series folder, a missing label, a missing image
    pairs = base / "pairs"
    (pairs / "images").mkdir(parents=True)
    shutil.copy(ct, pairs / "images" / "ct.nii.gz")
    shutil.copy(ct, pairs / "images" / "ct2.nii.gz")
    _flipped(seg, pairs / "labels" / "ct.nii.gz")
    shutil.copy(seg, pairs / "labels" / "gone.nii.gz")
    _series_with_label(pairs)
    for name in ("CT5N", "CT2N"):  # a folder of several items cannot take one label map
        shutil.copytree(SERIES.parent / name, pairs / "two" / name)
    shutil.copy(pairs / "series_seg.nii.gz", pairs / "labels" / "two.nii.gz")
    (pairs / "pairs.csv").write_text(
        "image,label\n"
        "images/ct.nii.gz,labels/ct.nii.gz\n"
        "series,series_seg.nii.gz\n"
        "images/ct2.nii.gz,labels/missing.nii.gz\n"
        "images/gone.nii.gz,labels/gone.nii.gz\n"
        "two,labels/two.nii.gz\n"
    )
    # B. Medical Segmentation Decathlon: dataset.json lists training pairs
    msd = base / "Task03_Liver"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / sub).mkdir(parents=True)
    shutil.copy(ct, msd / "imagesTr" / "liver_1.nii.gz")
    shutil.copy(seg, msd / "labelsTr" / "liver_1.nii.gz")
    shutil.copy(seg, msd / "labelsTr" / "liver_9.nii.gz")  # named nowhere
    shutil.copy(ct, msd / "imagesTs" / "liver_2.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background"},
        "training": [{"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}],
        "test": ["./imagesTs/liver_2.nii.gz"],
    }))  # fmt: skip
    # B. nnU-Net v2 raw: imagesTr/CASE_XXXX with labelsTr/CASE, two channels
    nn = base / "Dataset001_Abdomen"
    for sub in ("imagesTr", "labelsTr"):
        (nn / sub).mkdir(parents=True)
    shutil.copy(ct, nn / "imagesTr" / "abd_001_0000.nii.gz")
    _shifted(ct, nn / "imagesTr" / "abd_001_0001.nii.gz", 0.0)  # a second channel, same grid
    _flipped(seg, nn / "labelsTr" / "abd_001.nii.gz")
    shutil.copy(seg, nn / "labelsTr" / "abd_077.nii.gz")  # a label without images
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0, "organ": 1},
        "numTraining": 1, "file_ending": ".nii.gz",
    }))  # fmt: skip
    src = [
        {"name": n, "root": str(base / n), "label": "{stem}_seg.nii.gz"}
        for n in ("ref", "flip", "shift")
    ]
    src += [
        {"name": "pairs", "root": str(pairs), "label_pairs": "pairs.csv", "modality": "CT"},
        {"name": "msd", "root": str(msd), "label_pairs": "dataset.json"},
        {"name": "nnunet", "root": str(nn), "label_pairs": "dataset.json"},
    ]
    # one CT in many layouts (no dedup); real paths, which the tests look samples up by
    return {"sources": src, "dedup": {"exact": False}, "deid": {"hash_paths": False}}


@pytest.fixture(scope="module")
def job(tmp_path_factory, sample_data):
    import ray

    base = tmp_path_factory.mktemp("layouts")
    spec = _layouts(base, sample_data / "totalsegmentator")
    dest = base / "out"
    os.environ["MEDFM_DEID_KEY"] = KEY.decode()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_ingest(parse_spec(spec), str(dest), keyring=Keyring(KEY), progress=False)
    finally:
        ray.shutdown()
    assert verify(str(dest)).ok
    shards = ShardSet(str(dest))
    samples: dict[tuple[str, str], object] = {}
    for row in shards.rows():
        samples[row["dataset"], json.loads(row["provenance"])["path"]] = shards.read_sample(row)
    lines = (dest / "quarantine.jsonl").read_text().splitlines()
    quarantine = {(r["source"], r["path"]): r["reason"] for r in map(json.loads, lines)}
    return base, samples, quarantine


def test_label_on_a_flipped_permuted_grid_is_aligned_in_physical_space(job, sample_data):
    _, samples, quarantine = job
    expected = _lps(sample_data / "totalsegmentator" / SEG)
    ref, flip = samples["ref", "ct.nii.gz"], samples["flip", "ct.nii.gz"]
    assert np.array_equal(ref.label_map, expected)
    assert np.array_equal(flip.label_map, expected)  # same voxels despite the PRS grid
    assert flip.geometry == ref.geometry
    assert ("flip", "ct.nii.gz") not in quarantine


def test_label_shifted_in_physical_space_is_refused_with_the_distance(job):
    _, samples, quarantine = job
    assert ("shift", "ct.nii.gz") not in samples
    reason = quarantine["shift", "ct.nii.gz"]
    assert "4.5 mm" in reason and "physical space" in reason


def test_label_pairs_csv_pairs_nifti_and_a_dicom_series(job, sample_data):
    base, samples, quarantine = job
    expected = _lps(sample_data / "totalsegmentator" / SEG)
    assert np.array_equal(samples["pairs", "images/ct.nii.gz"].label_map, expected)
    series = next(
        s for (ds, rel), s in samples.items() if ds == "pairs" and rel.startswith("series/")
    )
    assert series.kind == "volume3d" and series.label_map is not None
    assert np.array_equal(series.label_map, _lps(base / "pairs" / "series_seg.nii.gz"))
    assert series.label_map.any() and not series.label_map.all()
    # a named label that does not exist, and one whose image does not: quarantined, with where
    assert "not found" in quarantine["pairs", "labels/missing.nii.gz"]
    assert "<file>.csv row 4" in quarantine["pairs", "labels/missing.nii.gz"]
    assert "not used" in quarantine["pairs", "labels/gone.nii.gz"]
    assert "<file>.csv row 5" in quarantine["pairs", "labels/gone.nii.gz"]
    assert "its folder holds 3 series or images" in quarantine["pairs", "labels/two.nii.gz"]
    assert samples["pairs", "images/ct2.nii.gz"].label_map is None  # converted, unlabelled
    assert not any(rel.startswith("labels/") for ds, rel in samples if ds == "pairs")
    assert ("pairs", "pairs.csv") not in quarantine  # the pairs file is no input


def test_decathlon_dataset_json(job, sample_data):
    _, samples, quarantine = job
    expected = _lps(sample_data / "totalsegmentator" / SEG)
    assert np.array_equal(samples["msd", "imagesTr/liver_1.nii.gz"].label_map, expected)
    assert samples["msd", "imagesTs/liver_2.nii.gz"].label_map is None
    assert "not used" in quarantine["msd", "labelsTr/liver_9.nii.gz"]
    assert not any(rel.startswith("labelsTr/") for ds, rel in samples if ds == "msd")
    assert ("msd", "dataset.json") not in quarantine


def test_nnunet_v2_raw_dataset_with_two_channels(job, sample_data):
    _, samples, quarantine = job
    expected = _lps(sample_data / "totalsegmentator" / SEG)
    chans = [samples["nnunet", f"imagesTr/abd_001_000{c}.nii.gz"] for c in (0, 1)]
    for s in chans:
        assert np.array_equal(s.label_map, expected)
    assert chans[0].patient_id == chans[1].patient_id  # one case, one patient, one split
    assert "not used" in quarantine["nnunet", "labelsTr/abd_077.nii.gz"]
    assert not any(rel.startswith("labelsTr/") for ds, rel in samples if ds == "nnunet")


def test_a_4d_label_map_is_refused_not_cut_to_its_first_volume(tmp_path):
    four = nib.load(NIBABEL_FILES / "example4d.nii.gz")
    first = nib.Nifti1Image(np.asarray(four.dataobj)[..., 0], four.affine)
    nib.save(first, tmp_path / "mr.nii.gz")
    shutil.copy(NIBABEL_FILES / "example4d.nii.gz", tmp_path / "mr_seg.nii.gz")
    spec = {"sources": [{"name": "mr", "root": str(tmp_path), "format": "nifti",
                         "label": "{stem}_seg.nii.gz"}]}  # fmt: skip
    got = read_all(spec, key=KEY)
    assert [(kind, rel) for kind, rel, _ in got] == [("Q", "mr.nii.gz")]
    assert "label map holds 2 volumes" in got[0][2]
