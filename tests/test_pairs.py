"""A linked example: one patient's CT (DICOM), ECG (WFDB) and EHR rows, ingested as three shard
sets with the same key, join through `medfm shards pairs` and share one split."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest
from ingest_helpers import KEY, PYDICOM_FILES
from typer.testing import CliRunner

from medfm.cli import app
from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.shards import ShardSet
from medfm.shards.pairs import find_pairs, parse_window, time_span


@pytest.fixture(scope="module")
def linked(tmp_path_factory, sample_data):
    import ray

    tmp = tmp_path_factory.mktemp("linked")
    img, ecg, ehr = tmp / "in_img", tmp / "in_ecg" / "PATLINK", tmp / "in_ehr"
    img.mkdir()
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientID, ds.StudyDate = "PATLINK", "21800105"
    ds.save_as(img / "ct.dcm")
    ecg.mkdir(parents=True)
    hea = (sample_data / "wfdb" / "100.hea").read_text().splitlines()
    hea[1] = "100 2 360 36000 10:00:00 01/01/2180"  # first 100 s, dated (dd/mm/yyyy)
    (ecg / "100.hea").write_text("\n".join(hea) + "\n")
    shutil.copy(sample_data / "wfdb" / "100.dat", ecg / "100.dat")
    ehr.mkdir()
    (ehr / "patients.csv").write_text("pid,birth\nPATLINK,2120-03-01\nPATOTHER,2130-01-01\n")
    (ehr / "events.csv").write_text(
        "pid,time,code,value\n"
        "PATLINK,2180-01-01 08:00:00,HR,71\nPATLINK,2180-01-03 08:00:00,HR,90\n"
        "PATOTHER,2180-06-01 08:00:00,HR,60\n"
    )
    opts = {"patients": {"path": "patients.csv", "patient": "pid", "birth": "birth"},
            "tables": [{"name": "ev", "path": "events.csv", "patient": "pid", "time": ["time"],
                        "code": "VITAL//{code}", "value": "value"}], "min_count": 1}  # fmt: skip
    sources = {
        "img": {"name": "img", "root": str(img), "format": "dicom"},
        "ecg": {"name": "ecg", "root": str(tmp / "in_ecg"), "format": "wfdb",
                "patient_id": {"from": "folder"}},
        "ehr": {"name": "ehr", "root": str(ehr), "format": "event_tables", "options": opts},
    }  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, source in sources.items():
            spec = parse_spec({"sources": [source], "signal": {"target_rate": 250}})
            run_ingest(spec, str(tmp / name), progress=False, keyring=Keyring(KEY))
    finally:
        ray.shutdown()
    return {name: str(tmp / name) for name in sources}


@pytest.mark.slow  # a real Ray job
def test_same_patient_same_pseudonym_same_split(linked):
    rows = {n: list(ShardSet(p).rows()) for n, p in linked.items()}
    pid = Keyring(KEY).patient("PATLINK")
    splits = {r["split"] for rs in rows.values() for r in rs if r["patient_id"] == pid}
    assert len(splits) == 1
    assert {r["patient_id"] for r in rows["img"]} == {pid}
    assert len(rows["ecg"]) == 10 and len(rows["ehr"]) == 2


@pytest.mark.slow  # a real Ray job
def test_pairs_cli_counts_and_time_windows(linked):
    runner = CliRunner()

    def pairs(a, b, *extra):
        res = runner.invoke(app, ["shards", "pairs", linked[a], linked[b], "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    everything = pairs("img", "ehr")
    assert everything["pairs"] == 1 and everything["patients_joined"] == 1
    assert everything["patients_b"] == 2 and everything["split_mismatches"] == 0
    assert pairs("ecg", "ehr")["pairs"] == 10
    assert pairs("ecg", "ehr", "--window", "0s")["pairs"] == 10  # inside the EHR span
    assert pairs("img", "ecg", "--window", "1d")["pairs"] == 0  # CT 4 days after the ECG
    assert pairs("img", "ecg", "--window", "5d")["pairs"] == 10
    assert pairs("img", "ehr", "--window", "1d")["pairs"] == 0  # 2 days after the last event
    assert pairs("img", "ehr", "--window", "3d")["pairs"] == 1
    res = runner.invoke(app, ["shards", "pairs", linked["img"], linked["ehr"], "--window", "soon"])
    assert res.exit_code != 0 and "invalid time window" in res.output


@pytest.mark.slow  # a real Ray job
def test_pairs_api_lists_pairs(linked, tmp_path):
    report = find_pairs(linked["ecg"], linked["ehr"], "2d", collect=True)
    assert report.pairs == len(report.rows) == 10
    assert {r["split_a"] for r in report.rows} == {r["split_b"] for r in report.rows}
    out = tmp_path / "pairs.jsonl"
    res = CliRunner().invoke(app, ["shards", "pairs", linked["ecg"], linked["ehr"], "--out",
                                   str(out)])  # fmt: skip
    assert res.exit_code == 0 and "10 pairs" in res.output
    assert len(out.read_text().splitlines()) == 10


def test_time_spans_and_windows():
    assert parse_window("30d") == 30 * 86400 and parse_window("90m") == 5400
    assert parse_window("3600") == 3600.0
    with pytest.raises(ValueError):
        parse_window("-1d")
    assert time_span({"time": "2180-01-01T00:00:00"}) == (time_span({"time_start":
                                                          "2180-01-01"})[0],) * 2  # fmt: skip
    day = time_span({"dicom": {"StudyDate": "21800105"}})
    assert day[1] - day[0] == 86400 - 1
    assert time_span({}) is None and time_span({"time": "not a time"}) is None


def test_pairs_refuses_a_folder_that_is_no_shard_set(tmp_path):
    from medfm.shards import ShardFormatError

    with pytest.raises(ShardFormatError):
        find_pairs(str(tmp_path), str(tmp_path))
