"""Signal ingest on real recordings: WFDB (MIT-BIH 100 + .atr, PTB s0010_re, multi-segment
041s), pydicom's 12-lead waveform_ecg.dcm, pyedflib's real EEG EDF files; bad inputs and PHI
canaries through the real Ray job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pyedflib
import pytest
import wfdb
from ingest_helpers import KEY, PYDICOM_FILES, read_items
from scipy.signal import resample_poly

from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.signals.channels import canonical_name, unit_factor
from medfm.ingest.signals.readers import BEAT_SYMBOLS
from medfm.shards import ShardSet, verify

EDF_FILES = Path(pyedflib.__file__).parent / "tests" / "data"
# Real Fp1 EEG with EDF+ annotations; both files hold the same recording, so one job reads one
# of them (the job drops exact duplicate windows).
REAL_EEG = ["test_subsecond.edf", "test_utf8.edf"]


@pytest.fixture(scope="module")
def wfdb_dir(sample_data) -> Path:
    return sample_data / "wfdb"


def read_all(spec_dict: dict) -> list[tuple[str, str, object]]:
    """Discover and read in-process (no Ray): [("S", rel, sample) | ("Q", rel, reason)]."""
    return read_items(spec_dict)[1]


def src(name, root, fmt, **kw):
    return {"name": name, "root": str(root), "format": fmt, **kw}


def ingest(tmp: Path, sources: list, signal: dict | None = None, **extra) -> Path:
    out = tmp / "out"
    spec = parse_spec({"sources": sources, "signal": signal or {}, **extra})
    run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    return out


def samples(out: Path) -> list:
    ss = ShardSet(str(out))
    return [ss.read_sample(r) for r in ss.rows()]


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- vocabulary and units


@pytest.mark.parametrize(
    "raw, name",
    [("ii", "II"), ("avr", "aVR"), ("Lead I (Einthoven)", "I"), ("MLII", "MLII"),
     ("v5", "V5"), ("vx", "VX"), ("EEG Fp1-REF", "Fp1"), ("FP1", "Fp1"), ("EEG T3-LE", "T3"),
     ("ABP", "ABP"), ("sine 5Hz", None), ("XYZ", None)],
)  # fmt: skip
def test_canonical_channel_names(raw, name):
    assert canonical_name(raw) == name


def test_unit_factors():
    assert unit_factor("uV", "mV") == pytest.approx(1e-3)
    assert unit_factor("mV", "uV") == pytest.approx(1e3)
    assert unit_factor("µV", "uV") == 1.0
    assert unit_factor("mmHg", "mV") is None


# ---------------------------------------------------------------- real recordings, in-process


def test_mitbih_windows_carry_beats_and_match_a_plain_wfdb_read(wfdb_dir):
    got = read_all(
        {"sources": [src("mit", wfdb_dir, "wfdb", include=["100.hea"])],
         "signal": {"target_rate": 250, "normalize": "none"}}
    )  # fmt: skip
    wins = [s for kind, _, s in got if kind == "S"]
    assert len(wins) == 180 and all(k == "S" for k, _, _ in got)  # 30 min / 10 s
    rec = wfdb.rdrecord(str(wfdb_dir / "100"))
    plain = resample_poly(rec.p_signal[:, 0], 25, 36)  # 360 -> 250 Hz, mV
    w0 = wins[0]
    assert w0.channels == ["MLII", "V5"] and w0.sampling_rate == 250 and w0.modality == "ECG"
    assert np.allclose(w0.data[0], plain[:2500], atol=1e-4)
    ann = wfdb.rdann(str(wfdb_dir / "100"), "atr")
    beats = [s for s in ann.symbol if s in BEAT_SYMBOLS]
    n_in_windows = sum(len(w.labels["beats"]) for w in wins)
    assert n_in_windows == len(beats) - sum(  # beats in the last partial second are not windowed
        1 for t, s in zip(ann.sample, ann.symbol, strict=True) if s in BEAT_SYMBOLS and t >= 648000
    )
    for w in wins[:20]:
        assert len(w.extras["beat_idx"]) == len(w.labels["beats"])
        assert (w.extras["beat_idx"] >= 0).all() and (w.extras["beat_idx"] < 2500).all()
    assert sum(w.labels["beat_counts"].get("V", 0) for w in wins) == ann.symbol.count("V")
    assert all(w.labels["rhythms"] == ["N"] for w in wins)  # record 100 is sinus throughout


def test_ptb_15_leads_and_multisegment_record(wfdb_dir):
    got = read_all(
        {"sources": [src("w", wfdb_dir, "wfdb", include=["s0010_re.hea", "041s/*.hea"])]}
    )
    by_rel = {}
    for kind, rel, s in got:
        assert kind == "S", (rel, s)
        by_rel.setdefault(rel, []).append(s)
    assert set(by_rel) == {"s0010_re.hea", "041s/041s.hea"}  # segment headers are no records
    ptb = by_rel["s0010_re.hea"]
    assert len(ptb) == 3 and ptb[0].data.shape == (15, 5000)
    assert ptb[0].channels[:12] == ["I", "II", "III", "aVR", "aVL", "aVF"] + [
        f"V{i}" for i in range(1, 7)
    ]
    (seg,) = by_rel["041s/041s.hea"]  # 2 x 8 s segments -> one 10 s window
    assert seg.meta["segments"] == 2 and seg.meta["source_rate"] == 500  # 125 Hz x 4 per frame
    assert seg.meta["interpolated"] == 1  # the one invalid sample of lead I
    assert np.isfinite(seg.data).all()


def test_dicom_waveform_12_leads_in_millivolts():
    got = read_all(
        {"sources": [src("d", PYDICOM_FILES, "dicom_waveform", include=["waveform_ecg.dcm"])],
         "signal": {"target_rate": None, "normalize": "none"}}
    )  # fmt: skip
    (w,) = [s for _, _, s in got]
    ds = pydicom.dcmread(PYDICOM_FILES / "waveform_ecg.dcm")
    raw_uv = ds.waveform_array(0).T
    assert w.data.shape == (12, 10000) and w.sampling_rate == 1000
    assert w.channels[:3] == ["I", "II", "III"] and w.meta["units"][0] == "mV"
    assert np.allclose(w.data, raw_uv / 1000.0, atol=1e-6)
    assert w.meta["time"][:10] != "2013-01-25"  # acquisition date shifted


def test_edf_eeg_with_annotations_overlap_and_normalization():
    got = read_all(
        {"sources": [src("e", EDF_FILES, "edf", include=["test_utf8.edf"])],
         "signal": {"target_rate": 256, "window_s": 4, "overlap": 0.5, "normalize": "window"}}
    )  # fmt: skip
    wins = [s for _, _, s in got]
    f = pyedflib.EdfReader(str(EDF_FILES / "test_utf8.edf"))
    n = f.getNSamples()[0] * 2  # 128 -> 256 Hz
    raw = f.readSignal(0)
    onsets, _, texts = f.readAnnotations()
    f.close()
    assert len(wins) == (n - 1024) // 512 + 1
    assert wins[0].channels == ["Fp1"] and wins[0].modality == "EEG"
    assert wins[0].meta["units"] == ["uV"]
    events = {e[2] for w in wins for e in w.labels.get("events", [])}
    assert set(texts) <= events  # every annotation lands in a window, UTF-8 text intact
    w1 = wins[1]  # overlap 0.5: starts 2 s in; un-normalize and compare with the raw signal
    mean, std = w1.extras["norm"]
    back = w1.data[0] * std[0] + mean[0]
    plain = resample_poly(raw, 2, 1)[512 : 512 + 1024]
    assert np.allclose(back, plain, atol=1e-3)
    assert abs(float(w1.data.mean())) < 1e-4 and abs(float(w1.data.std()) - 1) < 1e-3
    assert wins[0].meta["time"][:10] != "2020-01-24"


def test_bad_windows_masked_or_quarantined(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, (2, 5000))
    x[1, 2500:] = 0.2  # lead II flat in the second 10 s window
    x[0, 100:200] = np.nan  # 1% missing in the first window of lead I
    lines = ["I,II"] + [f"{a},{b}" for a, b in x.T]
    (tmp_path / "rec.csv").write_text("\n".join(lines).replace("nan", ""))
    base = {"sources": [src("c", tmp_path, "signal_csv", options={"csv_fs": 250})]}
    for how in ("quarantine", "mask"):  # one bad lead of two: masked, the window kept
        got = read_all({**base, "signal": {"target_rate": None, "bad_window": how}})
        w0, w1 = (s for _, _, s in got)
        assert list(w0.extras["mask"]) == [1, 0] and w0.meta["bad_channels"] == {"I": "nan"}
        assert list(w1.extras["mask"]) == [0, 1] and (w1.data[1] == 0).all()


# ---------------------------------------------------------------- the Ray job: real + bad inputs


def _bad_inputs(wfdb_dir: Path, root: Path) -> None:
    """Every bad-input case of the issue, beside good copies that must still convert."""
    w = root / "wfdb"
    w.mkdir(parents=True)
    for ext in ("hea", "dat", "atr"):
        shutil.copy(wfdb_dir / f"100.{ext}", w / f"100.{ext}")
    hea = (wfdb_dir / "100.hea").read_text()
    (w / "trunc.hea").write_text(hea.replace("100.dat", "trunc.dat").replace("100 2", "trunc 2"))
    (w / "trunc.dat").write_bytes((wfdb_dir / "100.dat").read_bytes()[:100_001])
    long = hea.replace("100.dat", "long.dat").replace("100 2 360 650000", "long 2 360 900000")
    (w / "long.hea").write_text(long)
    shutil.copy(wfdb_dir / "100.dat", w / "long.dat")
    (w / "lead.hea").write_text(hea.replace("100.dat", "lead.dat").replace("100 2", "lead 2")
                                .replace(" V5", " XYZ"))  # fmt: skip
    shutil.copy(wfdb_dir / "100.dat", w / "lead.dat")
    e = root / "edf"
    e.mkdir()
    bad = bytearray((EDF_FILES / "test_subsecond.edf").read_bytes())
    bad[252:256] = b"zz  "  # number of signals
    (e / "corrupt.edf").write_bytes(bytes(bad))
    c = root / "csv"
    c.mkdir()
    rows = "\n".join(f"{np.sin(i / 9):.4f},{np.cos(i / 7):.4f}" for i in range(3000))
    (c / "good.csv").write_text("I,II\n" + rows)
    (c / "latin1.csv").write_bytes(b"I,II\n" + rows.encode() + b"\n0.1,\xe9\xff\n")
    (c / "nocol.csv").write_text("I,III\n" + rows)


@pytest.mark.slow  # a real Ray job
def test_job_real_and_bad_inputs(ray_local, wfdb_dir, tmp_path):
    _bad_inputs(wfdb_dir, tmp_path / "in")
    sources = [
        src("mit", tmp_path / "in" / "wfdb", "wfdb", include=["*.hea"]),
        src("ptb", wfdb_dir, "wfdb", include=["s0010_re.hea", "041s/*.hea"]),
        src("eeg", EDF_FILES, "edf", include=REAL_EEG[:1]),
        src("edfbad", tmp_path / "in" / "edf", "edf"),
        src("ecgdcm", PYDICOM_FILES, "dicom_waveform", include=["waveform_ecg.dcm"]),
        src("csv", tmp_path / "in" / "csv", "signal_csv",
            options={"csv_fs": 250, "csv_columns": ["I", "II"]}),
    ]  # fmt: skip
    out = ingest(tmp_path, sources, {"target_rate": 250}, deid={"hash_paths": False})  # opt-in
    assert verify(str(out)).ok
    rows = list(ShardSet(str(out)).rows())
    per = {}
    for r in rows:
        per.setdefault((r["dataset"], json.loads(r["provenance"])["path"]), []).append(r)
    assert len(per[("mit", "100.hea")]) == 180
    assert len(per[("ptb", "s0010_re.hea")]) == 3 and len(per[("ptb", "041s/041s.hea")]) == 1
    assert len(per[("eeg", REAL_EEG[0])]) == 69  # 698 s of EEG in 10 s windows
    assert len(per[("ecgdcm", "waveform_ecg.dcm")]) == 1
    assert len(per[("csv", "good.csv")]) == 1
    beats = json.loads(per[("mit", "100.hea")][0]["labels"])["beats"]
    assert beats and set(beats) <= set(BEAT_SYMBOLS)
    reasons = {q["path"]: q["reason"] for q in quarantine(out)}
    # A rejected record is quarantined once per file it reads (header and signal file).
    bad = {"trunc.hea", "trunc.dat", "long.hea", "long.dat", "lead.hea", "lead.dat",
           "corrupt.edf", "latin1.csv", "nocol.csv"}  # fmt: skip
    assert set(reasons) == bad, reasons
    assert "truncated" in reasons["trunc.hea"] and "needing" in reasons["long.hea"]
    assert "unknown channel name 'XYZ'" in reasons["lead.hea"]
    assert "not a readable EDF" in reasons["corrupt.edf"]
    assert "not UTF-8" in reasons["latin1.csv"] and "missing column" in reasons["nocol.csv"]
    assert all(str(tmp_path) not in r for r in reasons.values())
    for r in rows:  # one patient, one split; the split follows the pseudonym
        assert r["split"] in ("train", "val", "test")
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())


# ---------------------------------------------------------------- PHI canaries


CANARIES = ["CANARYNAMEQX", "CANARYIDQX", "CANARYCOMMENTQX", "CANARYTECHQX", "CANARYEQUIPQX",
            "CANARYADMINQX", "CANARYRECQX", "CANARYFOLDERQX", "CANARYANNOTQX", "2001-03-12",
            "12/03/2001", "12-MAR-2001", "17-MAY-1961", "1961-05-17", "12.03.01"]  # fmt: skip


def _phi_inputs(wfdb_dir: Path, root: Path) -> None:
    w = root / "CANARYFOLDERQX"
    w.mkdir(parents=True)
    hea = (wfdb_dir / "100.hea").read_text().splitlines()
    hea[1] = "100 2 360 650000 10:20:30 12/03/2001"  # base time and date (a real date field)
    hea += ["# Name: CANARYNAMEQX", "# MRN: CANARYIDQX", "# CANARYCOMMENTQX born 1961"]
    (w / "100.hea").write_text("\n".join(hea) + "\n")
    shutil.copy(wfdb_dir / "100.dat", w / "100.dat")
    src_edf = pyedflib.EdfReader(str(EDF_FILES / "test_subsecond.edf"))
    sig = src_edf.readSignal(0)
    hdr = src_edf.getSignalHeader(0)
    src_edf.close()
    import datetime as dt

    f = pyedflib.EdfWriter(str(w / "eeg.edf"), 1, file_type=pyedflib.FILETYPE_EDFPLUS)
    f.setPatientName("CANARYNAMEQX")
    f.setPatientCode("CANARYIDQX")
    f.setPatientAdditional("CANARYCOMMENTQX")
    f.setTechnician("CANARYTECHQX")
    f.setEquipment("CANARYEQUIPQX")
    f.setAdmincode("CANARYADMINQX")
    f.setRecordingAdditional("CANARYRECQX")
    f.setBirthdate(dt.date(1961, 5, 17))
    f.setStartdatetime(dt.datetime(2001, 3, 12, 10, 20, 30))
    f.setSignalHeader(0, hdr)
    f.writeSamples([sig])
    f.writeAnnotation(3.0, -1, "CANARYANNOTQX")
    f.close()
    rows = "\n".join(f"{np.sin(i / 9):.4f},{np.cos(i / 7):.4f},CANARYNAMEQX" for i in range(3000))
    (w / "ecg.csv").write_text("I,II,patient_name\n" + rows)


@pytest.mark.slow  # a real Ray job
def test_phi_canaries_never_reach_any_output_byte(ray_local, wfdb_dir, tmp_path):
    _phi_inputs(wfdb_dir, tmp_path / "in")
    root = tmp_path / "in"
    planted = b"".join(p.read_bytes() for p in root.rglob("*.*"))
    # The folder canary is a path; the EDF recording field is 80 bytes, so pyedflib cuts
    # CANARYRECQX off after admin code, technician and equipment.
    skip = {"CANARYFOLDERQX", "CANARYRECQX"}
    missing = [c for c in CANARIES[:9] if c not in skip and c.encode() not in planted]
    assert not missing  # the canaries are really in the inputs
    pid = {"from": "folder"}
    sources = [
        src("w", root, "wfdb", include=["**/*.hea"], patient_id=pid),
        src("e", root, "edf", include=["**/*.edf"], patient_id=pid),
        src("c", root, "signal_csv", include=["**/*.csv"], patient_id=pid,
            options={"csv_fs": 250, "csv_columns": ["I", "II"]}),
    ]  # fmt: skip
    out = ingest(tmp_path, sources, {"target_rate": 250, "keep_events": False},
                 deid={"hash_paths": True})  # fmt: skip
    rows = list(ShardSet(str(out)).rows())
    assert {r["dataset"] for r in rows} == {"w", "e", "c"}
    assert len({r["patient_id"] for r in rows}) == 1  # the folder is the patient everywhere
    leaks = []
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            leaks += [(str(p.relative_to(out)), c) for c in CANARIES if c.encode() in data]
        leaks += [(str(p), c) for c in CANARIES if c in p.name]
    assert not leaks, leaks
    times = {json.loads(r["meta"]).get("time", "")[:10] for r in rows if r["dataset"] != "c"}
    assert times and "2001-03-12" not in times  # dates shifted, not dropped
