"""EHR ingest through the real Ray job: the full MIMIC-IV demo, MEDS Parquet, a spec-mapped
hospital extract with every bad-row case, train-only vocabulary and bins, the age cap."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from ingest_helpers import KEY

from medfm.ingest.ehr.vocab import SPECIAL, Vocabulary, bottom_k
from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring, split_for
from medfm.ingest.spec import SpecError
from medfm.shards import ShardSet, verify

SPLIT = {"fractions": [0.6, 0.2, 0.2], "seed": 0}


def ingest(out: Path, source: dict, resume: bool = False):
    opt_in = {"hash_paths": False}  # real relative paths: these tests read them
    spec = parse_spec({"sources": [source], "split": SPLIT, "shards": {"task_items": 1},
                       "deid": opt_in})  # fmt: skip
    return run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY), resume=resume)


def split_of(raw: str) -> str:
    kr = Keyring(KEY)
    return split_for(kr, kr.patient(raw), SPLIT["fractions"], SPLIT["seed"])


def load(out: Path):
    ss = ShardSet(str(out))
    rows = list(ss.rows())
    vocab = Vocabulary.from_json((out / json.loads(rows[0]["meta"])["vocab"]).read_text())
    return ss, rows, vocab


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- MIMIC-IV demo


@pytest.mark.slow  # a real Ray job
def test_mimic_iv_demo_to_per_patient_sequences(ray_local, sample_data, tmp_path):
    root = sample_data / "mimic-iv-demo-2.2"
    source = {"name": "mimic", "root": str(root), "format": "mimic_iv",
              "include": ["hosp/*.csv.gz", "icu/*.csv.gz"], "options": {"buckets": 4}}  # fmt: skip
    out = tmp_path / "mimic"
    ingest(out, source)
    assert verify(str(out)).ok
    ss, rows, vocab = load(out)
    subjects = pacsv.read_csv(root / "hosp" / "patients.csv.gz").column("subject_id").to_pylist()
    assert len(rows) == len(subjects) == 100  # one sample per patient
    assert sorted(r["patient_id"] for r in rows) == sorted(
        Keyring(KEY).patient(str(s)) for s in subjects
    )
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    for r in rows:
        raw = next(str(s) for s in subjects if Keyring(KEY).patient(str(s)) == r["patient_id"])
        assert r["split"] == split_of(raw)
    assert "ehr/mimic/vocab.json" in ss.manifest.header["files"]  # hashed, verified
    header = ss.manifest.header["datasets"]["mimic"]["ehr"]
    assert header["split"] == "train" and header["train_patients"] < 100
    names = set(vocab.tokens)
    assert {"GENDER//F", "GENDER//M"} <= names and any(t.startswith("ICD10//") for t in names)
    assert any(t.startswith("LAB//") for t in names) and "LAB//50912" in vocab.edges
    total_events = 0
    for r in rows:
        s = ss.read_sample(r)
        assert s.kind == "ehr" and s.data.dtype == np.int32
        assert s.data[0] == vocab.id("[CLS]") and vocab.tokens[s.data[1]].startswith("GENDER//")
        n = len(s.data)
        assert all(len(s.extras[k]) == n for k in ("age", "time", "delta", "type"))
        assert (np.diff(s.extras["time"]) >= 0).all()  # events in time order
        assert s.extras["age"].max() <= 90 and s.extras["age"].min() >= 18
        total_events += s.meta["events"]
    assert total_events > 100_000
    assert not (out / "quarantine.jsonl").read_text()  # nothing refused in the real demo
    again = ingest(out, source, resume=True)  # resume: every task reused, same manifest
    assert again.tasks_run == 0 and [r["sha256"] for r in ShardSet(str(out)).rows()] == [
        r["sha256"] for r in rows
    ]


@pytest.mark.slow  # a real Ray job
def test_mimic_per_admission(ray_local, sample_data, tmp_path):
    root = sample_data / "mimic-iv-demo-2.2"
    tables = [t for t in _preset_tables() if t["name"] in ("admissions", "labs")]
    source = {"name": "adm", "root": str(root), "format": "mimic_iv", "include": ["hosp/*"],
              "options": {"sample_per": "admission", "tables": tables, "buckets": 2}}  # fmt: skip
    out = tmp_path / "adm"
    ingest(out, source)
    ss, rows, _ = load(out)
    adm = pacsv.read_csv(root / "hosp" / "admissions.csv.gz")
    assert len(rows) == adm.num_rows  # every admission has its admission event
    assert len({r["patient_id"] for r in rows}) == 100
    assert all(r["study_id"] for r in rows) and len({r["study_id"] for r in rows}) == len(rows)


def _preset_tables():
    from medfm.ingest.ehr.presets import MIMIC_IV

    return MIMIC_IV["tables"]


# ---------------------------------------------------------------- MEDS


@pytest.mark.slow  # a real Ray job
def test_meds_parquet(ray_local, sample_data, tmp_path):
    root = sample_data / "mimic-iv-demo-2.2" / "hosp"
    pats = pacsv.read_csv(root / "patients.csv.gz").slice(0, 6).to_pylist()
    labs = pacsv.read_csv(root / "labevents.csv.gz")
    rows = []
    for p in pats:
        sid = p["subject_id"]
        rows.append((sid, None, f"GENDER//{p['gender']}", None))
        born = np.datetime64(f"{p['anchor_year'] - p['anchor_age']}-01-01T00:00:00")
        rows.append((sid, born, "MEDS_BIRTH", None))
    mask = np.isin(labs.column("subject_id").to_numpy(), [p["subject_id"] for p in pats])
    sub = labs.filter(pa.array(mask))
    cols = [sub.column(c).to_pylist() for c in ("subject_id", "charttime", "itemid", "valuenum")]
    for sid, t, item, v in zip(*cols, strict=True):
        rows.append((sid, np.datetime64(t), f"LAB//{item}", v))
    sid, time, code, value = zip(*rows, strict=True)
    table = pa.table({
        "subject_id": pa.array(sid, pa.int64()),
        "time": pa.array([None if t is None else t.astype("datetime64[us]") for t in time],
                         pa.timestamp("us")),
        "code": pa.array(code), "numeric_value": pa.array(value, pa.float32()),
    })  # fmt: skip
    (tmp_path / "meds" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "meds" / "data" / "0.parquet")
    out = tmp_path / "out"
    ingest(out, {"name": "meds", "root": str(tmp_path / "meds"), "format": "meds",
                 "options": {"min_count": 1, "buckets": 2}})  # fmt: skip
    ss, got, vocab = load(out)
    assert len(got) == 6 and "MEDS_BIRTH" not in vocab.tokens
    for r in got:
        s = ss.read_sample(r)
        codes = [vocab.tokens[i] for i in s.data]
        assert codes[1].startswith("GENDER//") and s.extras["age"].min() > 0
        assert s.meta["events"] == int((s.extras["type"] == 1).sum())  # one code per event
        assert all(c.startswith("LAB//") or c == "[UNK]" for c, k in
                   zip(codes, s.extras["type"], strict=True) if k == 1)  # fmt: skip


# ---------------------------------------------------------------- a hospital extract


PATIENTS = [f"p{i:02d}" for i in range(40)]


def _extract(root: Path) -> dict:
    """A spec-mapped extract with bad rows of every kind; returns what the test expects."""
    root.mkdir(parents=True)
    births = {p: "1950-01-01" for p in PATIENTS} | {"old": "1900-06-01", "edge": "1910-07-01",
                                                    "quiet": "1960-01-01"}  # fmt: skip
    (root / "patients.csv").write_text(
        "person_id,birth_date,sex,full_name\n"
        + "".join(
            f"{p},{b},{'F' if i % 2 else 'M'},Jane Doe{i}\n"
            for i, (p, b) in enumerate(births.items())
        )  # fmt: skip
    )
    rng = np.random.default_rng(0)
    lines, train_values = ["person_id,time,loinc,value,comment"], []
    for p in PATIENTS + ["old", "edge"]:
        train = split_of(p) == "train"
        for d in range(5):
            v = float(rng.uniform(0, 100)) if train else 1e6
            if train:
                train_values.append(v)
            lines.append(f"{p},2000-01-{d + 1:02d} 08:00:00,X,{v},free text {p}")
            if not train:
                lines.append(f"{p},2000-01-{d + 1:02d} 09:00:00,LEAK,1,free text")
    lines += ["p01,,X,5,", "p01,yesterday,X,5,", "p01,1899-01-01 00:00:00,X,5,"]
    body = ("\n".join(lines) + "\n").encode() + b"p02,2000-02-01 00:00:00,\xe9\xff,3,\n"
    (root / "labs.csv").write_bytes(body)
    (root / "dx.csv").write_text("person_id,days,icd10\np03,10957,I10\np03,-5,E11\np03,nan,E78\n")
    (root / "broken.csv").write_text("person_id,time,value\np04,2000-01-01,1\n")
    return {"train_values": train_values}


def _extract_source(root: Path) -> dict:
    return {
        "name": "hosp",
        "root": str(root),
        "format": "event_tables",
        "options": {
            "patients": {"path": "patients.csv", "patient": "person_id",
                         "birth": "birth_date", "codes": ["SEX//{sex}"]},
            "tables": [
                {"name": "labs", "path": "labs.csv", "patient": "person_id", "time": ["time"],
                 "code": "LAB//{loinc}", "value": "value"},
                {"name": "dx", "path": "dx.csv", "patient": "person_id", "time": ["days"],
                 "time_unit": "d", "code": "ICD10//{icd10}"},
                {"name": "broken", "path": "broken.csv", "patient": "person_id",
                 "time": ["time"], "code": "LAB//{loinc}"},
            ],
            "min_count": 1, "bins": 4, "buckets": 3,
        },
    }  # fmt: skip


@pytest.mark.slow  # a real Ray job
def test_extract_bad_rows_train_only_bins_and_age_cap(ray_local, tmp_path):
    expect = _extract(tmp_path / "in")
    out = tmp_path / "out"
    ingest(out, _extract_source(tmp_path / "in"))
    assert verify(str(out)).ok
    ss, rows, vocab = load(out)
    assert len(rows) == 43  # every patient, nothing lost
    got = {(q["path"], q["reason"]) for q in quarantine(out)}
    assert got == {
        ("labs.csv", "1 rows: missing time"),
        ("labs.csv", "1 rows: invalid time (unparsable, NaN or negative)"),
        ("labs.csv", "1 rows: not UTF-8"),
        ("labs.csv", "1 rows: event before birth"),
        ("dx.csv", "2 rows: invalid time (unparsable, NaN or negative)"),
        ("broken.csv", "<file>.csv: missing column(s) ['loinc']"),  # no file name in reasons
    }, got
    # No leakage: codes and values seen only in val/test patients shape nothing.
    assert "LAB//LEAK" not in vocab.tokens
    qs = np.quantile(expect["train_values"], [0.25, 0.5, 0.75])
    assert np.allclose(vocab.edges["LAB//X"], qs)
    everyone = PATIENTS + ["old", "edge", "quiet"]
    assert vocab.fitted_on["train_patients"] == sum(split_of(p) == "train" for p in everyone)
    by_pid = {r["patient_id"]: ss.read_sample(r) for r in rows}
    kr = Keyring(KEY)
    old, edge, young = (
        by_pid[kr.patient("old")],
        by_pid[kr.patient("edge")],
        by_pid[kr.patient("p05")],
    )
    assert (old.extras["age"] == 90).all()  # ~99 years old: capped
    assert (edge.extras["age"] == 90).all()  # 89.5 is over 89: capped
    assert 49 < young.extras["age"].min() < 51
    p01 = [vocab.tokens[i] for i in by_pid[kr.patient("p01")].data]
    assert p01.count("LAB//X") == 5  # its three bad rows are gone, its good rows stay
    quiet = by_pid[kr.patient("quiet")]  # a patient without events keeps a sequence
    assert quiet.meta["events"] == 0 and len(quiet.data) == 2 and "time_start" not in quiet.meta
    leaks = 5 if split_of("p03") != "train" else 0
    assert by_pid[kr.patient("p03")].meta["events"] == 5 + leaks + 1  # + its 1 valid diagnosis
    leak = by_pid[kr.patient(next(p for p in PATIENTS if split_of(p) != "train"))]
    toks = [vocab.tokens[i] for i in leak.data]
    assert "[UNK]" in toks and toks.count("Q3") == 5  # 1e6 falls in the top bin
    assert all(t in SPECIAL or "//" in t or t.startswith(("Q", "[")) for t in toks)
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for phi in (b"Jane Doe", b"free text", b"p01", b"1950-01-01"):
        assert phi not in everything  # unmapped columns, raw ids and dates never stored


def test_identifying_columns_are_refused_unless_allowed(tmp_path):
    src = _extract_source(tmp_path)
    src["options"]["tables"][0]["code"] = "LAB//{comment}"
    from medfm.ingest.registry import create_reader

    with pytest.raises(SpecError, match=r"options.tables\[0\]: column 'comment'"):
        create_reader("event_tables", **src["options"])
    src["options"]["allow_columns"] = ["comment"]
    create_reader("event_tables", **src["options"])
    with pytest.raises(SpecError, match="options.tables"):
        create_reader("event_tables", **{**src["options"], "tables": "labs"})


def test_gzip_csv_streams_in_batches(tmp_path):
    from medfm.ingest.ehr.tables import open_batches
    from medfm.io import get_fs

    p = tmp_path / "t.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(1_000_000)))
    fs, _ = get_fs(str(tmp_path))
    sizes = [b.num_rows for b in open_batches(fs, str(p), ["b"], 50_000)]
    assert sum(sizes) == 1_000_000 and max(sizes) <= 50_000  # never one whole-table read


def test_bottom_k_keeps_each_codes_lowest_priorities_and_merges_exactly():
    rng = np.random.default_rng(0)
    codes = rng.choice(7, size=5_000, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.04, 0.01])
    values, prio, k = rng.normal(size=5_000), rng.random(5_000), 300

    def by_code(c, v, p):
        return {int(x): sorted(p[c == x].tolist()) for x in np.unique(c)}

    c, v, p = bottom_k(codes, values, prio, k)
    want = {x: sorted(prio[codes == x])[:k] for x in range(7)}  # the k lowest, by brute force
    assert by_code(c, v, p) == want
    assert all(v[p == q][0] == values[prio == q][0] for q in p[:50])  # values travel with them
    halves = [bottom_k(codes[s], values[s], prio[s], k) for s in (slice(2500), slice(2500, None))]
    merged = bottom_k(*(np.concatenate(parts) for parts in zip(*halves, strict=True)), k)
    assert by_code(*merged) == want  # the bottom-k of the parts' bottom-k
