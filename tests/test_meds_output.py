"""The MEDS dataset EHR ingest writes beside the token shards (ehr/<source>/meds/): valid under
the `meds` package's schemas, read back by meds_reader (the MEDS ecosystem's C++ reader), and
the same patients, events, splits and shifted times as the token shards, on a Synthea-style
export and on the real MIMIC-IV demo."""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import meds
import pyarrow.parquet as pq
import pytest
from ingest_helpers import KEY
from synthea_helpers import write_synthea

from medfm.ingest.ehr.meds_out import subject_id
from medfm.ingest.ehr.vocab import TYPE_STATIC, Vocabulary
from medfm.ingest.job import run_ingest
from medfm.ingest.load import load_spec, parse_spec
from medfm.ingest.privacy import Keyring
from medfm.shards import ShardSet, verify

SPEC = Path(__file__).resolve().parents[1] / "ingest" / "specs" / "ehr_synthea.yaml"
SPLITS = {"train": "train", "val": "tuning", "test": "held_out"}


def meds_database(meds_root: Path, dest: Path):
    """Convert with meds_reader_convert and open the meds_reader SubjectDatabase."""
    import meds_reader

    exe = Path(sys.executable).parent / "meds_reader_convert"
    proc = subprocess.run([str(exe), str(meds_root), str(dest), "--num_threads", "1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return meds_reader.SubjectDatabase(str(dest))


def check_schemas(root: Path) -> None:
    """Every file of a MEDS root validates against the `meds` package's schemas."""
    data = sorted((root / meds.data_subdirectory).glob("*.parquet"))
    assert data
    for p in data:
        meds.DataSchema.validate(pq.read_table(p))
    meds.CodeMetadataSchema.validate(pq.read_table(root / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(root / meds.subject_splits_filepath))
    meds.DatasetMetadataSchema.validate(json.loads((root / meds.dataset_metadata_filepath)
                                                   .read_text()))  # fmt: skip


def expected_subjects(out: Path, source: str) -> dict[int, dict]:
    """Per MEDS subject id, what the token shards say: split and event counts."""
    ss = ShardSet(str(out))
    subjects = {}
    for r in ss.rows():
        s = ss.read_sample(r)
        subjects[subject_id(r["patient_id"])] = {
            "split": SPLITS[r["split"]],
            "events": s.meta["events"],
            "statics": int((s.extras["type"] == TYPE_STATIC).sum()),
            "born": bool(s.extras["age"][-1] >= 0) if s.meta["events"] else None,  # -1: unknown
        }
    return subjects


def compare(db, subjects: dict[int, dict], vocab: Vocabulary, splits: Path) -> None:
    assert sorted(db) == sorted(subjects)
    split = dict(zip(*pq.read_table(splits).to_pydict().values(), strict=True))
    for sid in db:
        want = subjects[sid]
        assert split[sid] == want["split"]
        events = db[sid].events
        static = [e for e in events if e.time is None]
        births = [e for e in events if e.code == meds.birth_code]
        timed = [e for e in events if e.time is not None and e.code != meds.birth_code]
        assert len(static) == want["statics"] and len(timed) == want["events"]
        if want["born"] is not None:
            assert len(births) == int(want["born"])
        times = [e.time for e in events if e.time is not None]
        assert times == sorted(times)
        assert all(e.code in vocab.index or e.code == meds.birth_code for e in events)


@pytest.mark.slow  # a real Ray job
def test_synthea_meds_output_reads_back(ray_local, tmp_path):
    data = write_synthea(tmp_path / "csv")
    patients = data.root / "patients.csv"  # one patient ~100 years old: the age cap applies
    patients.write_text(patients.read_text().replace(data.birth_dates[0], "1915-01-01", 1))
    spec = load_spec(SPEC, [f"sources.0.root={data.root}", "sources.0.options.buckets=2",
                            "split.fractions=[0.6,0.2,0.2]"])  # fmt: skip
    out = tmp_path / "out"
    run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    assert verify(str(out)).ok
    root = out / "ehr" / "synthea" / "meds"
    files = ShardSet(str(out)).manifest.header["files"]
    assert all(f"ehr/synthea/meds/{p.relative_to(root)}" in files
               for p in root.rglob("*") if p.is_file())  # fmt: skip
    check_schemas(root)
    vocab = Vocabulary.from_json((out / "ehr" / "synthea" / "vocab.json").read_text())
    db = meds_database(root, tmp_path / "db")
    subjects = expected_subjects(out, "synthea")
    assert len(subjects) == len(data.patients) == len(db)
    compare(db, subjects, vocab, root / meds.subject_splits_filepath)
    kr = Keyring(KEY)
    begin = {r["Id"]: r["START"] for r in csv.DictReader((data.root / "encounters.csv").open())}
    for row in csv.DictReader((data.root / "imaging_studies.csv").open()):
        # The study's time, written with a UTC offset, lands an hour after its encounter began
        # (written with Z), both moved by the patient's date shift.
        start = dt.datetime.fromisoformat(begin[row["ENCOUNTER"]].replace("Z", ""))
        want = start + dt.timedelta(hours=1, days=kr.shift_days(row["PATIENT"]))
        got = [e.time for e in db[subject_id(kr.patient(row["PATIENT"]))].events
               if e.code.startswith("IMAGING//")]  # fmt: skip
        assert got == [want], (got, want)
    old = db[subject_id(kr.patient(data.patients[0]))].events
    birth = next(e.time for e in old if e.code == meds.birth_code)
    assert (old[-1].time - birth).days / 365.25 <= 90.0  # HIPAA: no age over 90 is disclosed
    codes = set(pq.read_table(root / meds.code_metadata_filepath).column("code").to_pylist())
    assert {e.code for sid in db for e in db[sid].events} <= codes


@pytest.mark.slow  # a real Ray job
def test_mimic_demo_meds_output_reads_back(ray_local, sample_data, tmp_path):
    from medfm.ingest.ehr.presets import MIMIC_IV

    keep = ("admissions", "discharges", "deaths", "diagnoses", "labs", "rx")
    tables = [t for t in MIMIC_IV["tables"] if t["name"] in keep]
    source = {"name": "mimic", "root": str(sample_data / "mimic-iv-demo-2.2"),
              "format": "mimic_iv", "include": ["hosp/*.csv.gz"],
              "options": {"tables": tables, "buckets": 3}}  # fmt: skip
    spec = parse_spec({"sources": [source], "split": {"fractions": [0.6, 0.2, 0.2]},
                       "shards": {"task_items": 1}})  # fmt: skip
    out = tmp_path / "out"
    run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    assert not (out / "quarantine.jsonl").read_text()
    root = out / "ehr" / "mimic" / "meds"
    check_schemas(root)
    vocab = Vocabulary.from_json((out / "ehr" / "mimic" / "vocab.json").read_text())
    db = meds_database(root, tmp_path / "db")
    assert len(db) == 100
    compare(db, expected_subjects(out, "mimic"), vocab, root / meds.subject_splits_filepath)
    labs = sum(e.code.startswith("LAB//") and e.numeric_value is not None
               for sid in db for e in db[sid].events)  # fmt: skip
    assert labs > 50_000  # numeric lab values come through
