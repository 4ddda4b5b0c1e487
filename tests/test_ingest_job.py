"""The ingest job end to end on a real local Ray runtime: mixed real inputs, bad inputs, PHI
canaries, patient-level splits, duplicates, and kill -9 + --resume in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from ingest_helpers import KEY, NIBABEL_FILES, PYDICOM_FILES, small_ct, write_series
from PIL import Image

from medfm.ingest.bookkeeping import ResumeError
from medfm.ingest.job import plan_tasks, run_ingest, task_sizes
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring, split_for
from medfm.ingest.registry import SourceFile, SourceItem
from medfm.io import TMP_MARKER
from medfm.shards import Manifest, ShardSet, verify

ENV_KEY = KEY.decode()
MEDFM = str(Path(sys.executable).parent / "medfm")


@pytest.fixture(scope="module")
def ray_rt():
    import ray

    os.environ["MEDFM_DEID_KEY"] = ENV_KEY
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def ingest(spec: dict, dest: Path, **kw):
    return run_ingest(parse_spec(spec), str(dest), keyring=Keyring(KEY), progress=False, **kw)


def quarantine(dest: Path) -> dict[str, str]:
    lines = (dest / "quarantine.jsonl").read_text().splitlines()
    return {r["path"]: r["reason"] for r in map(json.loads, lines)}


# ---------------------------------------------------------------- real inputs, bad inputs


def _bad_inputs(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.dcm").write_text("not dicom\n" * 1000)
    raw = (NIBABEL_FILES / "anatomical.nii").read_bytes()
    import gzip

    gz = gzip.compress(raw)
    (folder / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    Image.new("1", (12_000, 12_000)).save(folder / "bomb.png")
    shutil.copy(NIBABEL_FILES / "anatomical.nii", folder / "vol.nii")
    small = sitk.RegionOfInterest(small_ct(), [10, 10, 10], [0, 0, 0]) > 0
    sitk.WriteImage(sitk.Cast(small, sitk.sitkUInt8), str(folder / "vol_seg.nii.gz"))
    (folder / "ghost.nii.gz").symlink_to(folder / "does-not-exist")
    (folder / "readme.foo").write_text("what is this")


def test_real_inputs_convert_verify_and_bad_ones_are_quarantined(ray_rt, tmp_path):
    _bad_inputs(tmp_path / "bad")
    write_series(small_ct(), tmp_path / "built", names=[f"{i}" for i in range(25)][::-1])
    spec = {
        "sources": [
            {"name": "ct_small", "root": str(PYDICOM_FILES), "include": ["CT_small.dcm"],
             "format": "dicom"},
            {"name": "mr_variants", "root": str(PYDICOM_FILES), "format": "dicom",
             "include": ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                         "MR_small_jpeg_ls_lossless.dcm"]},
            {"name": "dicomdir", "root": str(PYDICOM_FILES / "dicomdirtests"), "format": "dicom",
             "include": ["98892001/**", "77654033/**"]},
            {"name": "nib", "root": str(NIBABEL_FILES), "format": "nifti", "modality": "MR",
             "include": ["anatomical.nii", "example4d.nii.gz"]},
            {"name": "built", "root": str(tmp_path / "built"), "format": "dicom"},
            {"name": "bad", "root": str(tmp_path / "bad"), "label": "{stem}_seg.nii.gz"},
        ],
        "volume": {"spacing": [2.0, 2.0, 2.0]},
        "shards": {"task_items": 3},
        "deid": {"hash_paths": False},  # opt-in: the checks below read real paths
    }  # fmt: skip
    dest = tmp_path / "out"
    summary = ingest(spec, dest)
    report = verify(str(dest))
    assert report.ok, report.errors
    m = Manifest.open(str(dest))
    rows = list(m.rows(decode_json=True))
    by_ds = {}
    for r in rows:
        by_ds.setdefault(r["dataset"], []).append(r)
    assert len(by_ds["ct_small"]) == 1 and by_ds["ct_small"][0]["kind"] == "image2d"  # 1 slice
    assert len(by_ds["mr_variants"]) == 1  # four encodings of one SOP instance collapse
    assert {r["kind"] for r in by_ds["dicomdir"]} == {"volume3d", "image2d"}  # CT5N/CT2N + CR
    assert len(by_ds["nib"]) == 3 and len(by_ds["built"]) == 1
    q = quarantine(dest)
    assert "missing slice" in q["77654033/CT2/17106"]
    assert "not a DICOM file" in q["notes.dcm"] and "unrecognised" in q["readme.foo"]
    assert "truncated" in q["cut.nii.gz"] and "decompression bomb" in q["bomb.png"]
    assert "label map size" in q["vol.nii"] and "missing or unreadable" in q["ghost.nii.gz"]
    assert summary.written == len(rows) and summary.quarantined == len(q)
    assert summary.files_in > summary.written and summary.bytes_out > 0
    attrs = m.header["attributes"]["deidentification"]
    assert attrs["PatientIdentityRemoved"] == "YES" and "Annex E" in attrs["DeidentificationMethod"]
    for r in rows:
        p = r["provenance"]
        assert p["path"] and p["inputs"] and p["medfm_version"] and p["settings"]["volume"]
        assert r["split"] in ("train", "val", "test") and r["patient_id"].startswith("P")
    for r in by_ds["nib"]:  # hashed from the bytes the NIfTI reader read: the files' sha256
        for rel, digest in r["provenance"]["inputs"].items():
            assert digest == hashlib.sha256((NIBABEL_FILES / rel).read_bytes()).hexdigest()
    built = by_ds["built"][0]
    shard_set = ShardSet(str(dest))
    vol = shard_set.read_sample(next(r for r in shard_set.rows() if r["key"] == built["key"]))
    assert vol.geometry.spacing == (2.0, 2.0, 2.0) and vol.data.dtype == np.int16
    ct_stats = m.header["datasets"]["built"]["intensity"]["CT"]
    assert ct_stats["applied"] is False and ct_stats["std"] > 0


# ---------------------------------------------------------------- PHI canaries


CANARIES = {
    "PatientName": "Zqxcanaryname^Wilhelmina",
    "PatientID": "ZQX-CANARY-ID-4471",
    "OtherPatientIDs": "ZQXOTHERID9921",
    "PatientBirthDate": "19330517",
    "StudyDate": "19610719",
    "SeriesDate": "19610719",
    "AcquisitionDateTime": "19610719083000",
    "InstitutionName": "Zqx Canary General Hospital",
    "InstitutionAddress": "17 Zqxcanary Lane",
    "ReferringPhysicianName": "Zqxdoctor^Canary",
    "StudyDescription": "ZQX canary study description",
    "SeriesDescription": "ZQX canary series description",
    "AccessionNumber": "ZQXACC5512",
    "StationName": "ZQXSTATION",
}


def _plant(ds: pydicom.Dataset) -> None:
    for kw, v in CANARIES.items():
        setattr(ds, kw, v)
    ds.add_new(0x00091010, "LO", "ZQX private canary")
    block = ds.private_block(0x0011, "ZQXCREATOR", create=True)
    block.add_new(0x01, "LO", "ZQX private block canary")
    item = pydicom.Dataset()
    item.RequestedProcedureDescription = "ZQX nested canary"
    item.PersonName = "Zqxnested^Canary"
    inner = pydicom.Dataset()
    inner.PatientName = "Zqxdeep^Canary"
    inner.add_new(0x00131010, "LO", "ZQX deep private canary")
    item.ReferencedStudySequence = pydicom.Sequence([inner])
    ds.RequestAttributesSequence = pydicom.Sequence([item])


def _canary_inputs(root: Path) -> None:
    vol = sitk.RegionOfInterest(small_ct(), [33, 41, 6], [0, 0, 8])
    paths = write_series(vol, root / "series", patient=CANARIES["PatientID"])
    broken = write_series(vol, root / "broken", patient=CANARIES["PatientID"])
    broken[3].unlink()  # quarantined series: its reason must not leak either
    for p in paths + broken[:3] + broken[4:]:
        ds = pydicom.dcmread(p)
        _plant(ds)
        ds.save_as(p)
    cr = pydicom.dcmread(PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154")
    _plant(cr)
    cr.BurnedInAnnotation = "NO"
    cr.save_as(root / "cr.dcm")
    cr.BurnedInAnnotation = "YES"
    cr.SOPInstanceUID = pydicom.uid.generate_uid()
    cr.save_as(root / "cr_burned.dcm")


def _all_text(dest: Path, logs: str) -> list[tuple[str, bytes]]:
    """Every byte the job produced, plus decoded forms of compressed containers."""
    out = [("logs", logs.encode())]
    for p in sorted(dest.rglob("*")):
        out.append((f"name:{p}", str(p.relative_to(dest)).encode()))
        if p.is_file():
            out.append((str(p), p.read_bytes()))
    m = Manifest.open(str(dest))
    out.append(("manifest rows", json.dumps(list(m.rows()), default=str).encode()))
    return out


@pytest.mark.slow
def test_phi_canaries_never_reach_any_output(ray_rt, tmp_path):
    root = tmp_path / "Zqxcanaryfolder_Wilhelmina"
    _canary_inputs(root)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        json.dumps({"sources": [{"name": "canary", "root": str(root), "format": "dicom"}]})
    )
    dest = tmp_path / "out"
    env = {**os.environ, "MEDFM_DEID_KEY": ENV_KEY}
    address = ray_rt.get_runtime_context().gcs_address
    proc = subprocess.run(
        [MEDFM, "ingest", str(spec_path), "--out", str(dest), "--address", address,
         "--workers", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(Manifest.open(str(dest)).rows())
    assert {r["kind"] for r in rows} == {"volume3d", "image2d"}
    q = quarantine(dest)
    assert any("missing slice" in r for r in q.values())
    assert any("BurnedInAnnotation is YES" in r for r in q.values())
    needles = [v for v in CANARIES.values()] + [
        "Zqxcanaryfolder",
        "ZQX",
        "Zqx",
        "zqx",
        "Wilhelmina",
    ]
    needles += ["19330517", "19610719", "1961-07-19"]
    for where, blob in _all_text(dest, proc.stdout + proc.stderr):
        for needle in needles:
            assert needle.encode() not in blob, f"{needle!r} leaked into {where}"


# ---------------------------------------------------------------- splits and duplicates


def _patients_in_both_splits(kr: Keyring) -> tuple[str, str]:
    a = next(
        f"p{i}"
        for i in range(1000)
        if split_for(kr, kr.patient(f"p{i}"), [0.8, 0.1, 0.1]) == "train"
    )
    b = next(
        f"p{i}"
        for i in range(1000)
        if split_for(kr, kr.patient(f"p{i}"), [0.8, 0.1, 0.1]) != "train"
    )
    return a, b


def test_patient_level_splits_duplicates_and_near_duplicates(ray_rt, tmp_path):
    rng = np.random.default_rng(0)
    for site in ("site_a", "site_b"):
        for p in range(30):
            for n in range(2):
                img = rng.integers(0, 255, (32, 32), dtype=np.uint8)
                (tmp_path / site).mkdir(exist_ok=True)
                Image.fromarray(img).save(tmp_path / site / f"pt{p:02d}_{n}.png")
    # An exact copy under another patient, and a near copy across splits.
    shutil.copy(tmp_path / "site_a" / "pt00_0.png", tmp_path / "site_a" / "pt99_0.png")
    kr = Keyring(KEY)
    train_pt, other_pt = _patients_in_both_splits(kr)
    mr = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array.astype(float)
    smooth = (mr / mr.max() * 255).astype(np.uint8)  # a real MR slice
    Image.fromarray(smooth).save(tmp_path / "site_b" / f"{train_pt}_n.png")
    noisy = np.clip(smooth.astype(int) + rng.integers(-2, 3, smooth.shape), 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(tmp_path / "site_b" / f"{other_pt}_n.png")
    mapping = {"from": "regex", "regex": r"^([a-z]+\d+)_"}
    spec = {
        "sources": [
            {"name": s, "root": str(tmp_path / s), "format": "png", "modality": "CR",
             "patient_id": mapping} for s in ("site_a", "site_b")
        ],
        "shards": {"task_items": 16},
    }  # fmt: skip
    dest = tmp_path / "out"
    summary = ingest(spec, dest)
    rows = list(Manifest.open(str(dest)).rows(decode_json=True))
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())  # no patient in two splits
    pt3 = kr.patient("pt03")
    assert {r["dataset"] for r in rows if r["patient_id"] == pt3} == {"site_a", "site_b"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    report = json.loads((dest / "ingest_report.json").read_text())
    assert summary.duplicates == 1 and len(report["duplicates"]) == 1
    near = report["near_duplicates_across_splits"]
    pair = {kr.patient(train_pt), kr.patient(other_pt)}
    keys = {r["key"]: r["patient_id"] for r in rows}
    assert any({keys[n["a"]], keys[n["b"]]} == pair for n in near), near
    assert verify(str(dest)).ok


# ---------------------------------------------------------------- kill -9 and resume


def _resume_inputs(root: Path) -> dict:
    """14 CT volumes and 6 PNGs in `root`, and the spec that ingests them one task each."""
    vol = small_ct()
    root.mkdir()
    for i in range(14):
        shifted = sitk.Cast(vol + i, sitk.sitkInt16)
        sitk.WriteImage(shifted, str(root / f"vol{i:02d}.nii.gz"))
    for i in range(6):
        Image.fromarray(np.full((40, 40), i * 20, np.uint8)).save(root / f"img{i}.png")
    return {
        "sources": [{"name": "vols", "root": str(root), "modality": "CT"}],
        "volume": {"spacing": [1.0, 1.0, 1.0]},
        "shards": {"task_items": 1},
    }


def _comparable(dest: Path) -> tuple[list, dict]:
    m = Manifest.open(str(dest))
    return list(m.rows()), m.header["files"]


def _row_differences(rows: list, ref_rows: list) -> list:
    """(key, field, got, expected) for every field that differs, so a failure says where."""
    got, ref = {r["key"]: r for r in rows}, {r["key"]: r for r in ref_rows}
    diffs = [(k, "missing", None, None) for k in ref.keys() - got.keys()]
    diffs += [(k, "extra", None, None) for k in got.keys() - ref.keys()]
    for k in got.keys() & ref.keys():
        diffs += [(k, f, got[k][f], ref[k][f]) for f in ref[k] if got[k].get(f) != ref[k][f]]
    if not diffs and [r["key"] for r in rows] != [r["key"] for r in ref_rows]:
        diffs.append(("*", "order", [r["key"] for r in rows], [r["key"] for r in ref_rows]))
    return diffs


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(ray_rt, tmp_path):
    spec = _resume_inputs(tmp_path / "data")
    ingest(spec, tmp_path / "reference")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(spec))
    dest = tmp_path / "killed"
    env = {**os.environ, "MEDFM_DEID_KEY": ENV_KEY}
    # The subprocess joins this module's Ray runtime (--address): killing it is a driver kill.
    address = ray_rt.get_runtime_context().gcs_address
    cmd = [MEDFM, "ingest", str(spec_path), "--out", str(dest), "--address", address,
           "--workers", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    parts = dest / "_ingest" / "parts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3.0)  # a task already running when its driver died may still commit its part
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert not (dest / "manifest.json").exists() and 3 <= len(mtimes) < 20
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1])["tasks_reused"] == len(mtimes)
    for name, t in mtimes.items():  # finished tasks were not redone
        assert (parts / name).stat().st_mtime_ns == t
    rows, files = _comparable(dest)
    ref_rows, ref_files = _comparable(tmp_path / "reference")
    quarantine = dest / "quarantine.jsonl"
    assert _row_differences(rows, ref_rows) == [], quarantine.exists() and quarantine.read_text()
    assert rows == ref_rows and files == ref_files
    assert verify(str(dest)).ok
    with pytest.raises(ResumeError, match="--resume"):  # re-running without --resume refuses
        ingest(spec, dest)


def _kill_a_converting_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen running a conversion task. Ray titles a worker
    process `ray::<task name>` while it runs one, so the process table tells which it is.
    Only this test process's own Ray runtime's workers (its descendants): another test file
    may be converting in a parallel test process."""
    import psutil

    me = psutil.Process()
    while not stop.is_set() and not killed:
        for proc in me.children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:  # exited since it was listed
                continue
            if "ray::convert_task" in cmdline:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_conversion_gives_the_uninterrupted_manifest(ray_rt, tmp_path):
    spec = _resume_inputs(tmp_path / "data")
    ingest(spec, tmp_path / "reference")
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_converting_worker, args=(killed, stop))
    killer.start()
    try:
        summary = ingest(spec, tmp_path / "dest")  # Ray retries the killed worker's task
    finally:
        stop.set()
        killer.join()
    assert killed, "no conversion task was seen running"
    rows, files = _comparable(tmp_path / "dest")
    ref_rows, ref_files = _comparable(tmp_path / "reference")
    assert _row_differences(rows, ref_rows) == [] and files == ref_files
    assert summary.quarantined == 0 and summary.written == len(ref_rows)
    left = [p for p in (tmp_path / "dest").rglob("*") if TMP_MARKER in p.name]
    assert left == [], left  # the dead attempt's temporaries are gone
    assert verify(str(tmp_path / "dest")).ok


def test_ct_zscore_uses_dataset_statistics_from_a_first_pass(ray_rt, tmp_path):
    vol = small_ct()
    for i in range(3):
        sitk.WriteImage(sitk.Cast(vol + 40 * i, sitk.sitkInt16), str(tmp_path / f"ct{i}.nii"))
    spec = {
        "sources": [{"name": "ct", "root": str(tmp_path), "format": "nifti", "modality": "CT"}],
        "intensity": {"ct": "zscore", "ct_foreground_hu": 0},
        "deid": {"hash_paths": False},  # opt-in: the check below reads ct<i> from the path
    }
    ingest(spec, tmp_path / "out")
    m = Manifest.open(str(tmp_path / "out"))
    st = m.header["datasets"]["ct"]["intensity"]["CT"]
    assert st["applied"] is True and st["clip_low"] < st["clip_high"] and st["std"] > 0
    assert (tmp_path / "out" / "_ingest" / "stats.json").is_file()
    shard_set = ShardSet(str(tmp_path / "out"))
    raw = sitk.GetArrayFromImage(sitk.DICOMOrient(vol, "LPS")).T.astype(float)
    fg = []
    for row in shard_set.rows():
        s = shard_set.read_sample(row)
        assert s.data.dtype == np.float32 and s.meta["intensity"]["mode"] == "zscore"
        shift = 40 * int(s.provenance["path"][2])  # ct<i>.nii holds vol + 40 i
        fg.append(s.data[raw + shift > 0])
    pooled = np.concatenate(fg)  # the dataset's foreground, normalised with dataset stats
    assert abs(pooled.mean()) < 0.05 and abs(pooled.std() - 1) < 0.1


def test_unset_task_items_cut_a_job_into_32_tasks_of_equal_size_at_most_64_items():
    def spec(**shards):
        return parse_spec({"sources": [{"name": "a", "root": "/data", "format": "wfdb"}],
                           "shards": shards})  # fmt: skip

    counts = (0, 1, 4, 32, 33, 200, 2048, 2049, 10**6)
    sizes = [task_sizes(spec(), n) for n in counts]
    assert [sum(s) for s in sizes] == list(counts)  # every item in a task
    assert [len(s) for s in sizes] == [0, 1, 4, 32, 32, 32, 32, 33, 15625]
    assert all(max(s) - min(s) <= 1 and max(s) <= 64 for s in sizes if s)
    assert sizes[5] == [7] * 8 + [6] * 24  # 200 records: 16 per worker for 2, not 28 x 7 + 4
    assert task_sizes(spec(task_items=4), 10) == [4, 4, 2]  # as the user set


def test_tasks_follow_the_sizes_and_cut_short_at_task_bytes():
    def items(nbytes):
        return [SourceItem("a", "wfdb", (SourceFile(f"/data/r{i:03d}.dat", f"r{i:03d}.dat",
                                                    nbytes),))
                for i in range(200)]  # fmt: skip

    spec = parse_spec({"sources": [{"name": "a", "root": "/data", "format": "wfdb"}],
                       "shards": {"task_bytes": 3_000}})  # fmt: skip
    assert [len(t.items) for t in plan_tasks(items(100), spec)] == [7] * 8 + [6] * 24
    cut = plan_tasks(items(1_000), spec)  # 3 items reach task_bytes: every task cut at 3
    assert [len(t.items) for t in cut] == [3] * 66 + [2]
    assert plan_tasks(items(100), spec)[0].task_id == plan_tasks(items(100), spec)[0].task_id
