"""`medfm ingest --append` on a real local Ray runtime: a new manifest version over real NIfTI
volumes, the earlier version intact and readable by number, pseudonyms, splits and CT
statistics kept (or refit), duplicates of what the set holds dropped, refusals, and a kill -9
during an append followed by a re-run that finishes it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import SimpleITK as sitk
from ingest_helpers import KEY, small_ct
from s3_helpers import moto_s3
from typer.testing import CliRunner

from medfm.cli import app
from medfm.ingest.bookkeeping import ResumeError
from medfm.ingest.ehr.vocab import Vocabulary
from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.io import get_fs
from medfm.shards import (
    Manifest,
    PatchSampler,
    ShardDataConfig,
    ShardDataModule,
    ShardDataset,
    ShardFormatError,
    ShardSet,
    SourceConfig,
    verify,
    write_manifest,
)

MEDFM = str(Path(sys.executable).parent / "medfm")
SIDE_FILES = {"manifest.json", "quarantine.jsonl", "ingest_report.json"}  # rewritten per job


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_rt(s3):
    """A local Ray whose workers also reach the module's S3 server (moto, on loopback)."""
    import ray

    os.environ["MEDFM_DEID_KEY"] = KEY.decode()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": s3.env})  # fmt: skip
    yield ray
    ray.shutdown()


def ingest(spec: dict, dest: Path, key: bytes = KEY, **kw):
    return run_ingest(parse_spec(spec), str(dest), keyring=Keyring(key), progress=False, **kw)


def write_volume(folder: Path, name: str, shift: int) -> None:
    """nibabel's anatomical.nii (a real MR volume, used as HU) plus `shift`."""
    folder.mkdir(exist_ok=True)
    sitk.WriteImage(sitk.Cast(small_ct() + shift, sitk.sitkInt16), str(folder / name))


def spec_for(root: Path, **extra) -> dict:
    return {
        "sources": [{"name": "vols", "root": str(root), "format": "nifti", "modality": "CT",
                     "patient_id": {"from": "regex", "regex": r"^(p[A-Z])_"}}],
        "shards": {"task_items": 1},
        **extra,
    }  # fmt: skip


def set_files(dest: Path) -> dict[str, str]:
    """sha256 of every file of the set, bookkeeping and the per-job side files aside."""
    out = {}
    for p in sorted(dest.rglob("*")):
        rel = p.relative_to(dest).as_posix()
        if p.is_file() and rel not in SIDE_FILES and not rel.startswith(("_ingest", "_logs")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def by_key(m: Manifest) -> dict[str, dict]:
    return {r["key"]: r for r in m.rows()}


def test_version_headers_are_checked(tmp_path):
    """Version fields and an earlier version's header are checked before anything is read."""
    root = tmp_path / "set"
    write_manifest(str(root), [], [])
    write_manifest(str(root), [], [], version=2)
    assert Manifest.open(str(root)).version == 2 == Manifest.open(str(root), version=1).latest
    with pytest.raises(ShardFormatError, match="newest version is 2"):
        write_manifest(str(root), [], [], version=2)  # a version on top of one that is gone
    header = json.loads((root / "manifest.json").read_text())
    for bad in ({"version": 0}, {"version": "2"}, {"version": 3, "parent": 1}):
        (root / "manifest.json").write_text(json.dumps({**header, **bad}))
        with pytest.raises(ShardFormatError, match="version"):
            Manifest.open(str(root))
    (root / "manifest.json").write_text(json.dumps(header))
    kept = root / "versions" / "1" / "manifest.json"
    first = json.loads(kept.read_text())
    kept.write_text(json.dumps({**first, "version": 2, "parent": 1}))
    with pytest.raises(ShardFormatError, match="holds version 2"):
        Manifest.open(str(root), version=1)
    kept.write_text(json.dumps({**first, "manifest": {**first["manifest"], "path": "../x"}}))
    with pytest.raises(ShardFormatError, match="not a relative path inside"):
        Manifest.open(str(root), version=1)
    for number in (0, 3, True):
        with pytest.raises(ShardFormatError, match="no version"):
            Manifest.open(str(root), version=number)


def test_append_adds_a_version_and_leaves_the_first_intact(ray_rt, tmp_path):
    data, dest = tmp_path / "data", tmp_path / "out"
    write_volume(data, "pA_1.nii.gz", 0)
    write_volume(data, "pB_1.nii.gz", 100)
    spec = spec_for(data)
    assert ingest(spec, dest).written == 2
    v1 = Manifest.open(str(dest))
    v1_rows, v1_header, v1_files = by_key(v1), v1.header, set_files(dest)
    assert v1.version == 1 and "version" not in v1_header  # a set without appends: as before
    write_volume(data, "pA_2.nii.gz", 200)  # a second volume of patient A
    write_volume(data, "pC_1.nii.gz", 300)  # a new patient
    shutil.copy(data / "pB_1.nii.gz", data / "pD_copy.nii.gz")  # content the set holds

    summary = ingest(spec, dest, append=True)
    assert (summary.version, summary.skipped, summary.written) == (2, 2, 2)
    assert summary.duplicates == 1
    v2 = Manifest.open(str(dest))
    assert (v2.version, v2.latest, v2.header["parent"]) == (2, 2, 1)
    assert v2.header["manifest"]["path"] == "versions/2/manifest.parquet"
    appended = v2.header["attributes"]["ingest"]["append"]
    assert appended.pop("duplicate_inputs") and appended == {
        "parent": 1, "added": 2, "skipped": 2, "refit": False}  # fmt: skip
    rows = by_key(v2)
    assert len(rows) == 4 and {k: rows[k] for k in v1_rows} == v1_rows  # old rows unchanged
    new = [r for k, r in rows.items() if k not in v1_rows]
    old_a = next(r for r in v1_rows.values() if r["patient_id"] == Keyring(KEY).patient("pA"))
    new_a = [r for r in new if r["patient_id"] == old_a["patient_id"]]
    assert len(new_a) == 1 and new_a[0]["split"] == old_a["split"]  # same pseudonym, split
    assert v2.header["datasets"]["vols"]["samples"] == 4
    # Every file of version 1 is still there, byte for byte; the new ones are only added.
    now = set_files(dest)
    assert {k: now[k] for k in v1_files} == v1_files and len(now) > len(v1_files)
    assert all(r["shard"] not in v1_header["files"] for r in new)

    # Version 1 by number: its header and rows, readable and verified after version 2.
    again = Manifest.open(str(dest), version=1)
    assert again.header == v1_header and by_key(again) == v1_rows
    assert (again.version, again.latest) == (1, 2)
    old_set = ShardSet(str(dest), version=1)
    assert len(old_set) == 2 and old_set.read_sample(next(old_set.rows())).data.size
    loaded = {item["key"] for item in ShardDataset(str(dest), version=1, shuffle=False)}
    assert loaded == set(v1_rows) and len(ShardDataset(str(dest), shuffle=False)) == 4
    # The patch sampler and the data module read a version by number too.
    patched = {p["key"] for p in PatchSampler(str(dest), 8, mode="grid", version=1)}
    assert patched == set(v1_rows)
    dm = ShardDataModule(ShardDataConfig(train=[SourceConfig(str(dest), split=None, version=1)]))
    assert {item["key"] for item in dm.train_datasets()[0]} == set(v1_rows)
    for version in (None, 1):
        report = verify(str(dest), version=version)
        assert report.ok and not report.warnings, (version, report.errors, report.warnings)
    with pytest.raises(ShardFormatError, match="no version 3"):
        Manifest.open(str(dest), version=3)

    runner = CliRunner()
    r = runner.invoke(app, ["shards", "stats", str(dest), "--version", "1", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["samples"] == 2, r.output
    r = runner.invoke(app, ["shards", "ls", str(dest), "--json"])
    assert r.exit_code == 0 and len(r.output.splitlines()) == 4
    r = runner.invoke(app, ["shards", "verify", str(dest), "--version", "3"])
    assert r.exit_code == 2 and "no version 3" in r.output

    # The same append again: nothing new (the duplicate is remembered), no version 3; a plain
    # --resume is refused.
    again = ingest(spec, dest, append=True)
    assert (again.items, again.skipped, again.version) == (0, 5, 2)
    assert Manifest.open(str(dest)).latest == 2
    with pytest.raises(ResumeError, match="--append"):
        ingest(spec, dest, resume=True)


def test_append_keeps_ct_statistics_unless_refit(ray_rt, tmp_path):
    data = tmp_path / "data"
    for i, name in enumerate(("pA_1.nii.gz", "pB_1.nii.gz")):
        write_volume(data, name, 40 * i)
    spec = spec_for(data, intensity={"ct": "zscore", "ct_foreground_hu": 0})
    ingest(spec, tmp_path / "out")
    v1 = Manifest.open(str(tmp_path / "out"))
    v1_ct = v1.header["datasets"]["vols"]["intensity"]["CT"]
    shutil.copytree(tmp_path / "out", tmp_path / "refit")
    write_volume(data, "pC_1.nii.gz", 600)  # far brighter: a refit moves the statistics

    def new_sample(dest: Path):
        ss = ShardSet(str(dest))
        row = next(r for r in ss.rows() if r["key"] not in by_key(v1))
        return ss.read_sample(row)

    ingest(spec, tmp_path / "out", append=True)
    kept = Manifest.open(str(tmp_path / "out")).header["datasets"]["vols"]["intensity"]["CT"]
    assert kept == v1_ct
    applied = new_sample(tmp_path / "out").meta["intensity"]
    assert applied["mode"] == "zscore" and applied["mean"] == v1_ct["mean"]

    ingest(spec, tmp_path / "refit", append=True, refit=True)
    m = Manifest.open(str(tmp_path / "refit"))
    refit_ct = m.header["datasets"]["vols"]["intensity"]["CT"]
    assert m.header["attributes"]["ingest"]["append"]["refit"] is True
    assert refit_ct["mean"] > v1_ct["mean"] and refit_ct["voxels"] > 1.4 * v1_ct["voxels"]
    assert new_sample(tmp_path / "refit").meta["intensity"]["mean"] == refit_ct["mean"]
    assert {k: by_key(m)[k] for k in by_key(v1)} == by_key(v1)  # old samples as they were


def test_append_refusals(ray_rt, tmp_path):
    data = tmp_path / "data"
    write_volume(data, "pA_1.nii.gz", 0)
    spec = spec_for(data)
    with pytest.raises(ResumeError, match="no finished shard set"):
        ingest(spec, tmp_path / "none", append=True)
    ingest(spec, tmp_path / "out")
    before = set_files(tmp_path / "out")
    with pytest.raises(ResumeError, match="split"):
        ingest({**spec, "split": {"seed": 7}}, tmp_path / "out", append=True)
    with pytest.raises(ResumeError, match="key differs"):
        ingest(spec, tmp_path / "out", key=KEY[::-1], append=True)
    assert set_files(tmp_path / "out") == before
    assert not (tmp_path / "out" / "_ingest" / "append.json").exists()  # refusals leave none
    runner = CliRunner()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(spec))
    r = runner.invoke(app, ["ingest", str(spec_path), "--out", str(tmp_path / "x"), "--refit"])
    assert r.exit_code == 2 and "--append" in r.output
    r = runner.invoke(app, ["ingest", str(spec_path), "--out", str(tmp_path / "y"), "--append"])
    assert r.exit_code == 2 and "no finished shard set" in r.output, r.output


@pytest.mark.slow
def test_kill_9_during_an_append_then_rerun_finishes_it(ray_rt, tmp_path):
    data, dest = tmp_path / "data", tmp_path / "out"
    write_volume(data, "pA_1.nii.gz", 0)
    write_volume(data, "pB_1.nii.gz", 10)
    spec = spec_for(data)
    ingest(spec, dest)
    v1_rows, v1_files = by_key(Manifest.open(str(dest))), set_files(dest)
    parts = dest / "_ingest" / "parts"
    first_parts = {p.name for p in parts.glob("*.json")}
    for i in range(12):
        write_volume(data, f"p{chr(ord('C') + i)}_1.nii.gz", 20 + 10 * i)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}
    address = ray_rt.get_runtime_context().gcs_address  # the driver joins this runtime
    cmd = [MEDFM, "ingest", str(spec_path), "--out", str(dest), "--append", "--address",
           address, "--workers", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len({p.name for p in parts.glob("*.json")} - first_parts) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the append ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3.0)  # a task already running when its driver died may still commit its part
    done = {p.name for p in parts.glob("*.json")} - first_parts
    assert 2 <= len(done) < 12
    # Killed mid-append: version 1 is the set, whole and verified.
    m = Manifest.open(str(dest))
    assert (m.version, m.latest) == (1, 1) and by_key(m) == v1_rows
    assert verify(str(dest)).ok and (dest / "_ingest" / "append.json").is_file()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["version"] == 2 and summary["tasks_reused"] >= len(done)
    m = Manifest.open(str(dest))
    rows = list(m.rows())
    assert m.version == 2 and len(rows) == 14 and len({r["key"] for r in rows}) == 14
    assert {r["key"]: r for r in rows if r["key"] in v1_rows} == v1_rows
    now = set_files(dest)
    assert {k: now[k] for k in v1_files} == v1_files
    assert verify(str(dest)).ok and verify(str(dest), version=1).ok
    assert not (dest / "_ingest" / "append.json").exists()


def test_append_on_s3(ray_rt, s3, tmp_path):
    data, url = tmp_path / "data", s3.url("append")
    write_volume(data, "pA_1.nii.gz", 0)
    ingest(spec_for(data), url)
    fs, path = get_fs(url)
    v1 = Manifest.open(url)
    rels = [*v1.header["files"], "manifest.parquet"]
    before = {rel: fs.cat_file(f"{path}/{rel}") for rel in rels}
    write_volume(data, "pB_1.nii.gz", 50)
    assert ingest(spec_for(data), url, append=True).written == 1
    m = Manifest.open(url)
    assert (m.version, len(m), len(Manifest.open(url, version=1))) == (2, 2, 1)
    assert {rel: fs.cat_file(f"{path}/{rel}") for rel in before} == before
    assert fs.exists(f"{path}/versions/1/manifest.json")
    assert verify(url).ok and verify(url, version=1).ok


def mimic_subset(src: Path, dest: Path, tables: tuple[str, ...], subjects: set[int] | None):
    """The MIMIC-IV demo's `tables` (hosp/), only `subjects`' rows when given."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    (dest / "hosp").mkdir(parents=True, exist_ok=True)
    for t in tables:
        table = pacsv.read_csv(src / "hosp" / f"{t}.csv.gz")
        if subjects is not None:
            table = table.filter(pc.is_in(table["subject_id"], pa.array(sorted(subjects))))
        with pa.CompressedOutputStream(str(dest / "hosp" / f"{t}.csv.gz"), "gzip") as out:
            pacsv.write_csv(table, out)


@pytest.mark.slow  # two real Ray jobs over the MIMIC-IV demo
def test_ehr_append_adds_new_patients_with_the_sets_vocabulary(ray_rt, sample_data, tmp_path):
    """Version 1 holds 40 of the MIMIC-IV demo's patients; the full export then appended: the
    other 60 become samples tokenized with version 1's vocabulary (unchanged, same bytes), the
    40 keep their version-1 samples, the MEDS output stays version 1's, and --refit is refused
    for the EHR source."""
    import pyarrow.csv as pacsv

    mimic = sample_data / "mimic-iv-demo-2.2"
    tables = ("patients", "admissions", "diagnoses_icd")
    subjects = pacsv.read_csv(mimic / "hosp" / "patients.csv.gz")["subject_id"].to_pylist()
    data, dest = tmp_path / "export", tmp_path / "out"
    mimic_subset(mimic, data, tables, set(subjects[:40]))
    spec = {"sources": [{"name": "mimic", "root": str(data), "format": "mimic_iv",
                         "include": [f"hosp/{t}.csv.gz" for t in tables],
                         "options": {"buckets": 2}}]}  # fmt: skip
    ingest(spec, dest)
    v1 = by_key(Manifest.open(str(dest)))
    vocab_bytes = (dest / "ehr/mimic/vocab.json").read_bytes()
    assert len(v1) == 40

    mimic_subset(mimic, data, tables, None)  # the next export: every patient
    with pytest.raises(ResumeError, match="EHR source"):
        ingest(spec, dest, append=True, refit=True)
    summary = ingest(spec, dest, append=True)
    m = Manifest.open(str(dest))
    rows = by_key(m)
    assert (m.version, len(rows), summary.duplicates) == (2, 100, 40)
    assert {k: rows[k] for k in v1} == v1  # the 40 keep their version-1 samples
    kr = Keyring(KEY)
    assert {r["patient_id"] for r in rows.values()} == {kr.patient(str(s)) for s in subjects}
    assert (dest / "ehr/mimic/vocab.json").read_bytes() == vocab_bytes
    v1_files = Manifest.open(str(dest), version=1).header["files"]
    kept = [f for f in v1_files if f.startswith("ehr/mimic/")]  # the vocabulary and the MEDS set
    assert "ehr/mimic/vocab.json" in kept and any("/meds/" in f for f in kept)
    assert all(m.header["files"][f] == v1_files[f] for f in kept)
    vocab = Vocabulary.from_json(vocab_bytes.decode())
    ss = ShardSet(str(dest))
    for key in set(rows) - set(v1):
        codes = ss.read_sample(rows[key]).data
        assert codes.size and int(codes.max()) < len(vocab.tokens), key
    assert verify(str(dest)).ok and verify(str(dest), version=1).ok
