"""Where ingest reads and writes: `--out` inside a source root or on a file is refused (exit 2),
3D volumes go to an object store (fsspec memory://) and read back, and discovery survives
directory symlinks and symlink loops."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from medfm.ingest.cli import app
from medfm.ingest.imaging import Volume
from medfm.ingest.job import discover
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.sources import list_files
from medfm.shards import Sample
from medfm.shards.volume import VolumeStoreWriter, open_volume

CT, SEG = "example_ct_sm.nii.gz", "example_seg.nii.gz"
KEY = b"4f0fc4230292e66fa3a0f1f4846267c5d340f7c4db8b70c78acba3078cfc869e"  # tests only


def _spec_file(tmp_path: Path, root: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"sources:\n  - name: ct\n    root: {root}\n    format: nifti\n")
    return spec


def test_out_inside_a_source_root_is_refused(tmp_path, sample_data, monkeypatch):
    root = tmp_path / "raw"
    root.mkdir()
    shutil.copy(sample_data / "totalsegmentator" / CT, root / "ct.nii.gz")
    monkeypatch.setenv("MEDFM_DEID_KEY", KEY.decode())
    spec = _spec_file(tmp_path, root)
    for out in (root / "shards", root):
        res = CliRunner().invoke(app, [str(spec), "--out", str(out), "--quiet"])
        assert res.exit_code == 2, res.output
        assert "inside the root of source 'ct'" in res.output
        assert "own outputs" in res.output
    assert sorted(p.name for p in root.iterdir()) == ["ct.nii.gz"]  # nothing was written


def test_out_that_is_a_regular_file_has_its_own_message(tmp_path, sample_data, monkeypatch):
    root = tmp_path / "raw"
    root.mkdir()
    shutil.copy(sample_data / "totalsegmentator" / CT, root / "ct.nii.gz")
    monkeypatch.setenv("MEDFM_DEID_KEY", KEY.decode())
    out = tmp_path / "taken.txt"
    out.write_text("a file, not a shard set\n")
    res = CliRunner().invoke(app, [str(_spec_file(tmp_path, root)), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "is a file; give a folder" in res.output
    assert out.read_text() == "a file, not a shard set\n"


def test_volume_store_on_an_object_store_writes_and_reads_back(sample_data):
    """memory:// behaves like s3://: a prefix exists only while it holds objects."""
    fs = fsspec.filesystem("memory")
    root = f"/medfm-test-{uuid.uuid4().hex[:8]}"
    ts = sample_data / "totalsegmentator"
    img = Volume.owned(sitk.ReadImage(str(ts / CT)))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / SEG))).transpose(2, 1, 0)
    sample = Sample(key="ct-0001", kind="volume3d", modality="CT", dataset="ct",
                    patient_id="P1", split="train", data=img.array, label_map=label,
                    geometry=img.geometry)  # fmt: skip
    try:
        writer = VolumeStoreWriter(fs, root)
        rel, members, files = writer.add(sample)
        VolumeStoreWriter(fs, root)  # a second writer (another task) finds the store
        row = {"shard": rel, "shape": list(img.array.shape), "has_label_map": True}
        vol = open_volume(fs, root, row)
        assert np.array_equal(vol.image[...], img.array)
        assert np.array_equal(vol.label[...], label)
        assert vol.geometry == img.geometry
        assert all(fs.exists(f"{root}/{f.path}") for f in files)
        assert not [p for p in fs.find(root) if ".tmp-" in p]  # no temporary left behind
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _looped_root(tmp_path: Path, sample_data: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(sample_data / "totalsegmentator" / CT, root / "a" / "ct.nii.gz")
    shutil.copy(sample_data / "totalsegmentator" / SEG, outside / "seg.nii.gz")
    (root / "a" / "up").symlink_to("..")  # a loop: root/a/up/a/up/...
    (root / "ext").symlink_to(outside)  # a folder elsewhere
    (root / "again").symlink_to(root / "a")  # a second way into a folder already listed
    return root, outside


def test_directory_symlinks_are_not_followed_and_reported(tmp_path, sample_data):
    root, _ = _looped_root(tmp_path, sample_data)
    spec = parse_spec(
        {"sources": [{"name": "s", "root": str(root)}], "deid": {"hash_paths": False}}
    )
    items, bad, n_files = discover(spec, Keyring(KEY), None)  # no header scans: no Ray
    assert [i.rel for i in items] == ["a/ct.nii.gz"] and n_files == 1
    reasons = {r["path"]: r["reason"] for r in bad}
    assert set(reasons) == {"a/up", "ext", "again"}
    assert all("directory symlink not followed" in r for r in reasons.values())


def test_follow_symlinks_enters_each_folder_once_and_reports_loops(tmp_path, sample_data):
    root, _ = _looped_root(tmp_path, sample_data)
    src = parse_spec({"sources": [{"name": "s", "root": str(root), "follow_symlinks": True}]})
    _, files, notes = list_files(src.sources[0])
    assert [f.rel for f in files] == ["a/ct.nii.gz", "ext/seg.nii.gz"]
    assert {q.rel for q in notes} == {"a/up", "again"}
    assert all("loop" in q.reason for q in notes)
