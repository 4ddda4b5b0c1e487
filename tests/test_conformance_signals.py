"""Conformance sweep for signal ingest: every WFDB record of the sample data (MIT-BIH 100, PTB
s0010_re, multi-segment 041s: wfdb-python's sample records), every EDF/BDF file pyedflib ships,
and records derived from them (truncated, renamed without their header, FLAC-encoded, shortened,
without a sample count) go through the real readers and preprocessing (in-process, one record
at a time, no Ray). Each record's outcome (windows converted, or the quarantine reason) must
equal the committed table tests/conformance/signals.csv; a change fails here and is reviewed
into the table:

    MEDFM_CONFORMANCE_REGEN=1 pytest tests/test_conformance_signals.py   # rewrite, then diff
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest
import wfdb
from test_signals_realworld import EDF_FILES, MINUTE, derive_100, run

from medfm.io import write_text

TABLE = Path(__file__).parent / "conformance" / "signals.csv"
COLUMNS = ("record", "format", "outcome", "windows", "bad_windows", "channels", "reason")


def _halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def build_corpus(mit: Path, root: Path) -> list[tuple[str, str]]:
    """Lay out the real and derived records under `root`; [(relative path, format)]."""
    records = []
    shutil.copytree(mit, root / "wfdb", ignore=shutil.ignore_patterns("LICENSE*"))
    records += [("wfdb/100.hea", "wfdb"), ("wfdb/s0010_re.hea", "wfdb"),
                ("wfdb/041s/041s.hea", "wfdb")]  # fmt: skip
    (root / "edf").mkdir()
    for f in sorted(EDF_FILES.iterdir()):
        if f.suffix.lower() in (".edf", ".bdf"):
            shutil.copy(f, root / "edf" / f.name)
            records.append((f"edf/{f.name}", "edf"))
            trunc = root / "edf-truncated" / f.name
            trunc.parent.mkdir(exist_ok=True)
            shutil.copy(f, trunc)
            _halve(trunc)
            records.append((f"edf-truncated/{f.name}", "edf"))
    d = root / "derived"
    (d / "truncated").mkdir(parents=True)
    for name in ("100", "s0010_re"):  # signal file cut in half
        for ext in ("hea", "dat"):
            shutil.copy(mit / f"{name}.{ext}", d / "truncated" / f"{name}.{ext}")
        _halve(d / "truncated" / f"{name}.dat")
        records.append((f"derived/truncated/{name}.hea", "wfdb"))
    (d / "renamed").mkdir()  # files renamed, header text not: it names 100.dat
    shutil.copy(mit / "100.hea", d / "renamed" / "r100.hea")
    shutil.copy(mit / "100.dat", d / "renamed" / "r100.dat")
    records.append(("derived/renamed/r100.hea", "wfdb"))
    rec = wfdb.rdrecord(str(mit / "100"), physical=False, sampto=MINUTE)
    for folder, cut in (("flac", False), ("flac-truncated", True)):
        (d / folder).mkdir()
        wfdb.wrsamp("f100", fs=360, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal,
                    fmt=["516", "516"], adc_gain=rec.adc_gain, baseline=rec.baseline,
                    write_dir=str(d / folder))  # fmt: skip
        if cut:
            _halve(d / folder / "f100.dat")
        records.append((f"derived/{folder}/f100.hea", "wfdb"))
    derive_100(mit, d / "no-length", "n100", record_line="n100 2 360")
    derive_100(mit, d / "short", "s100", record_line="s100 2 360 1800")
    records += [("derived/no-length/n100.hea", "wfdb"), ("derived/short/s100.hea", "wfdb")]
    shutil.copytree(mit / "041s", d / "segment-missing")
    (d / "segment-missing" / "041s02.hea").unlink()
    records.append(("derived/segment-missing/041s.hea", "wfdb"))
    return records


def outcome(root: Path, rel: str, fmt: str) -> dict[str, str]:
    folder, name = os.path.split(rel)
    source = {"name": "c", "root": str(root / folder), "format": fmt, "include": [name]}
    _, got = run({"sources": [source], "signal": {}})
    wins = [s for k, _, s in got if k == "S"]
    reasons = [r for k, _, r in got if k == "Q"]
    assert all(str(root) not in r for r in reasons), reasons  # never an absolute path
    return {
        "record": rel,
        "format": fmt,
        "outcome": "converted" if wins else "quarantined",
        "windows": str(len(wins)),
        "bad_windows": str(len(reasons) if wins else 0),
        "channels": " ".join(wins[0].channels) if wins else "",
        "reason": "" if wins else reasons[0],
    }


@pytest.fixture(scope="module")
def sweep(sample_data, tmp_path_factory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("signals-corpus")
    return [outcome(root, rel, fmt) for rel, fmt in build_corpus(sample_data / "wfdb", root)]


def test_every_record_matches_the_conformance_table(sweep):
    if os.environ.get("MEDFM_CONFORMANCE_REGEN") == "1":
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(sweep)
        write_text(TABLE, buf.getvalue())
    with TABLE.open(newline="") as f:
        expected = {r["record"]: r for r in csv.DictReader(f)}
    got = {r["record"]: r for r in sweep}
    assert sorted(got) == sorted(expected), "records added or gone: regenerate the table"
    diff = {k: (expected[k], got[k]) for k in got if got[k] != expected[k]}
    assert not diff, diff


def test_sweep_covers_both_outcomes_and_every_reason_names_a_cause(sweep):
    by = {r["record"]: r for r in sweep}
    assert by["wfdb/100.hea"]["windows"] == "180" and by["wfdb/041s/041s.hea"]["windows"] == "1"
    assert by["derived/flac/f100.hea"]["outcome"] == "converted"
    for r in sweep:
        if r["outcome"] == "quarantined":
            assert r["reason"] and "Traceback" not in r["reason"], r
            assert not r["reason"].startswith("unexpected"), r
