"""Signal ingest on real records and records derived from them (issue 17): detector annotation
files, headers without a sample count, short records, 1/60 Hz numerics, the channel
vocabulary, bad-input messages, every file of a record in its item, companion files, per-channel
quality, modality and settings. Everything runs in-process through the real readers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyedflib
import pytest
import wfdb
import yaml
from ingest_helpers import KEY, read_items

from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.ingest.registry import is_companion
from medfm.ingest.signals import channels
from medfm.ingest.signals.readers import BEAT_SYMBOLS
from medfm.ingest.sources import list_files
from medfm.ingest.tasks import provenance

EDF_FILES = Path(pyedflib.__file__).parent / "tests" / "data"
MINUTE = 360 * 60  # samples of record 100 in a minute


@pytest.fixture(scope="module")
def mit(sample_data) -> Path:
    return sample_data / "wfdb"


run = read_items  # the conformance sweep imports it by this name


def wfdb_spec(root: Path, include: list[str], signal: dict | None = None, **options) -> dict:
    source = {"name": "w", "root": str(root), "format": "wfdb", "include": include}
    return {"sources": [{**source, "options": options}], "signal": signal or {}}


def derive_100(
    mit: Path,
    folder: Path,
    name: str,
    record_line: str | None = None,
    leads: tuple[str, str] = ("MLII", "V5"),
    annotations: bool = False,
) -> Path:
    """Record 100 under another name: its real .dat, a rewritten header (record line, lead
    names), optionally its real .atr."""  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    # The shipped 100.hea opens with a comment, has CRLF endings and a blank line: keep only
    # the record line and the two signal lines.
    lines = [x.strip() for x in (mit / "100.hea").read_text().splitlines()]
    lines = [x for x in lines if x and not x.startswith("#")][:3]
    lines[0] = record_line or f"{name} 2 360 {10 * MINUTE}"  # 10 minutes: fast tests
    lines[1] = lines[1].replace("100.dat", f"{name}.dat").replace("MLII", leads[0])
    lines[2] = lines[2].replace("100.dat", f"{name}.dat").replace("V5", leads[1])
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    shutil.copy(mit / "100.dat", folder / f"{name}.dat")
    if annotations:
        shutil.copy(mit / "100.atr", folder / f"{name}.atr")
    return folder / f"{name}.hea"


def write_detector_annotations(mit: Path, folder: Path, name: str, ext: str) -> int:
    """What a QRS detector (qrs, gqrsh, sqrs) writes: one 'N' per beat of 100.atr, no rhythm."""
    ann = wfdb.rdann(str(mit / "100"), "atr")
    beats = np.array([s in BEAT_SYMBOLS for s in ann.symbol])
    wfdb.wrann(name, ext, ann.sample[beats], ["N"] * int(beats.sum()), write_dir=str(folder))
    return int(beats.sum())


# ---------------------------------------------------------------- 1. detector annotations


@pytest.mark.parametrize("annotators", [["qrs"], ["gqrsh"], ["sqrs"], ["atr", "qrs"]])
def test_detector_annotations_without_rhythm_keep_beats(mit, tmp_path, annotators):
    derive_100(mit, tmp_path, "100", annotations=True)
    for ext in {"qrs", "gqrsh", "sqrs"} & set(annotators):
        write_detector_annotations(mit, tmp_path, "100", ext)
    _, got = run(wfdb_spec(tmp_path, ["100.hea"], {"target_rate": None}, annotators=annotators))
    assert [k for k, _, _ in got] == ["S"] * 60, got[:1]
    wins = [s for _, _, s in got]
    first = wins[0]
    n_detectors = len(set(annotators) - {"atr"})
    assert len(first.labels["beats"]) in range(10, 40 * n_detectors + 40)
    idx = first.extras["beat_idx"]
    assert len(idx) == len(first.labels["beats"]) and (np.diff(idx) >= 0).all()  # time order
    assert ("rhythms" in first.labels) == ("atr" in annotators)  # only atr has rhythm labels


# ---------------------------------------------------------------- 2. header without a length


def test_header_without_sample_count_reads_the_whole_file(mit, tmp_path):
    derive_100(mit, tmp_path, "nolen", record_line="nolen 2 360")  # wfdb takes it from the file
    _, got = run(wfdb_spec(tmp_path, ["nolen.hea"], {"target_rate": None}))
    assert [k for k, _, _ in got] == ["S"] * 180  # all 30 minutes of 100.dat


# ---------------------------------------------------------------- 3. records shorter than a window


def test_record_shorter_than_one_window_is_quarantined(mit, tmp_path):
    derive_100(mit, tmp_path, "short", record_line="short 2 360 1800")  # 5 s of record 100
    _, got = run(wfdb_spec(tmp_path, ["short.hea"]))
    assert got == [("Q", "short.hea", "record lasts 5.0 s, shorter than one window of 10 s")]


# ---------------------------------------------------------------- 4. numerics


def _minute_heart_rate(mit: Path) -> np.ndarray:
    """HR per minute of MIT-BIH 100 from its beat annotations (what a monitor's numerics hold)."""
    ann = wfdb.rdann(str(mit / "100"), "atr")
    beats = ann.sample[[s in BEAT_SYMBOLS for s in ann.symbol]]
    return np.bincount(beats // MINUTE, minlength=30)[:30].astype(float)


def test_numerics_record_is_refused_not_upsampled(mit, tmp_path):
    hr = _minute_heart_rate(mit)
    sig = np.stack([hr, np.full(30, 97.0) + (hr % 3), hr / 4], axis=1)  # HR, SpO2, RESP
    # Monitor-style fixed gains (wrsamp's own would put each extreme at an ADC limit).
    wfdb.wrsamp("n100", fs=1 / 60, units=["bpm", "%", "bpm"], sig_name=["HR", "SpO2", "RESP"],
                d_signal=np.round(sig * 10).astype(np.int32), fmt=["16"] * 3,
                adc_gain=[10.0] * 3, baseline=[0] * 3, write_dir=str(tmp_path))  # fmt: skip
    _, got = run(wfdb_spec(tmp_path, ["n100.hea"]))
    ((kind, _, reason),) = got
    assert kind == "Q" and "30000x" in reason and "max_resample_ratio 10" in reason
    _, got = run(wfdb_spec(tmp_path, ["n100.hea"], {"target_rate": None, "window_s": 600}))
    wins = [s for _, _, s in got]
    assert len(wins) == 3 and wins[0].data.shape == (3, 10) and wins[0].modality == "OT"
    assert wins[0].meta["units"] == ["bpm", "%", "bpm"]


def test_slow_companion_channel_is_dropped_with_its_reason(tmp_path):
    """Real Fp1 EEG (128 Hz) beside a 1 Hz numeric in one EDF: the numeric is not upsampled
    128x, it is dropped and named in every window."""
    f = pyedflib.EdfReader(str(EDF_FILES / "test_utf8.edf"))
    eeg, hdr = f.readSignal(0), f.getSignalHeader(0)
    f.close()
    n = len(eeg) // 128
    hr = 60 + 5 * np.sin(np.arange(n) / 30)
    num = {
        **hdr,
        "label": "HR",
        "dimension": "bpm",
        "sample_frequency": 1,
        "physical_min": 0,
        "physical_max": 250,
        "digital_min": -32768,
        "digital_max": 32767,
    }
    w = pyedflib.EdfWriter(str(tmp_path / "mixed.edf"), 2, file_type=pyedflib.FILETYPE_EDFPLUS)
    w.setSignalHeaders([hdr, num])
    w.writeSamples([eeg[: n * 128], hr])
    w.close()  # fmt: skip
    spec = {"sources": [{"name": "e", "root": str(tmp_path), "format": "edf"}],
            "signal": {"target_rate": None}}  # fmt: skip
    _, got = run(spec)
    wins = [s for _, _, s in got]
    assert wins and all(k == "S" for k, _, _ in got)
    assert wins[0].channels == ["Fp1"] and wins[0].data.shape == (1, 1280)
    assert "HR" in wins[0].meta["dropped_channels"]
    assert "1 Hz, 128x below" in wins[0].meta["dropped_reasons"]["HR"]


# ---------------------------------------------------------------- 5. channel vocabulary


def _vocabulary_file() -> dict:
    return yaml.safe_load(Path(channels.__file__).with_name("channels.yaml").read_text())


@pytest.mark.parametrize("alias, name", sorted(_vocabulary_file()["aliases"].items()))
def test_every_alias_maps_to_its_channel(alias, name):
    assert channels.canonical_name(alias) == name
    assert channels.canonical_name(alias.upper()) == name


@pytest.mark.parametrize(
    "name", [n for names in _vocabulary_file()["groups"].values() for n in names]
)
def test_every_name_is_its_own_canonical_name(name):
    assert channels.canonical_name(name) == name
    assert channels.canonical_name(name.lower()) == name


@pytest.mark.parametrize(
    "raw, name, group",
    [("MCL1", "MCL1", "ecg"), ("ECG", "ECG", "ecg"), ("EKG", "ECG", "ecg"),
     ("ECG1", "ECG1", "ecg"), ("ECG 2", "ECG2", "ecg"), ("FECG", "FECG", "ecg"),
     ("AECG", "AECG", "ecg"), ("Abdomen_1", "AECG1", "ecg"), ("EEG Fpz-Cz", "Fpz-Cz", "eeg"),
     ("EEG Pz-Oz", "Pz-Oz", "eeg"), ("FP1-F7", "Fp1-F7", "eeg"), ("T8-P8", "T8-P8", "eeg"),
     ("C3-A2", "C3", "eeg"), ("EEG Fp1-REF", "Fp1", "eeg"), ("Resp oro-nasal", "RESP", "other"),
     ("MLII", "MLII", "ecg")],
)  # fmt: skip
def test_issue_channel_names(raw, name, group):
    assert channels.canonical_name(raw) == name and channels.channel_group(name) == group


@pytest.mark.parametrize("leads", [("MCL1", "V5"), ("ECG", "V5"), ("ECG1", "ECG 2"),
                                   ("FECG", "AECG")])  # fmt: skip
def test_records_with_common_lead_names_convert(mit, tmp_path, leads):
    derive_100(mit, tmp_path, "r", leads=leads)
    _, got = run(wfdb_spec(tmp_path, ["r.hea"]))
    assert got and all(k == "S" for k, _, _ in got), got[:1]
    assert got[0][2].channels == [channels.canonical_name(x) for x in leads]
    assert got[0][2].modality == "ECG"


def test_sleep_edf_bipolar_derivations_convert(tmp_path):
    """Real EEG relabelled the Sleep-EDF / CHB-MIT way."""
    f = pyedflib.EdfReader(str(EDF_FILES / "test_utf8.edf"))
    eeg, hdr = f.readSignal(0), f.getSignalHeader(0)
    f.close()
    w = pyedflib.EdfWriter(str(tmp_path / "sc.edf"), 2, file_type=pyedflib.FILETYPE_EDFPLUS)
    w.setSignalHeaders([{**hdr, "label": "EEG Fpz-Cz"}, {**hdr, "label": "FP1-F7"}])
    w.writeSamples([eeg, eeg[::-1].copy()])
    w.close()
    _, got = run({"sources": [{"name": "e", "root": str(tmp_path), "format": "edf"}]})
    assert got and all(k == "S" for k, _, _ in got)
    assert got[0][2].channels == ["Fpz-Cz", "Fp1-F7"] and got[0][2].modality == "EEG"


# ---------------------------------------------------------------- 6. clear errors


def _flac_truncated(mit: Path, d: Path) -> None:
    rec = wfdb.rdrecord(str(mit / "100"), physical=False, sampto=MINUTE)
    wfdb.wrsamp("fl", fs=360, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal,
                fmt=["516", "516"], adc_gain=rec.adc_gain, baseline=rec.baseline,
                write_dir=str(d))  # fmt: skip
    data = (d / "fl.dat").read_bytes()
    (d / "fl.dat").write_bytes(data[: len(data) // 2])


def _atr_truncated(mit: Path, d: Path) -> None:
    derive_100(mit, d, "tr", annotations=True)
    (d / "tr.atr").write_bytes((mit / "100.atr").read_bytes()[:1001])


def _format_999(mit: Path, d: Path) -> None:
    hea = derive_100(mit, d, "f999")
    hea.write_text(hea.read_text().replace(" 212 ", " 999 "))


def _segment_missing(mit: Path, d: Path) -> None:
    shutil.copytree(mit / "041s", d / "041s")
    (d / "041s" / "041s02.hea").unlink()


def _all_gaps(mit: Path, d: Path) -> None:
    """A variable-layout multi-segment record whose only data segment is a gap."""
    d.mkdir(exist_ok=True)
    (d / "gap_layout.hea").write_text(
        "gap_layout 2 360 0\n~ 0 200/mV 11 1024 0 0 0 MLII\n~ 0 200/mV 11 1024 0 0 0 V5\n"
    )
    (d / "gap.hea").write_text("gap/2 2 360 7200\ngap_layout 0\n~ 7200\n")


@pytest.mark.parametrize(
    "make, header, expected",
    [(_flac_truncated, "fl.hea", "fl.dat: FLAC-compressed signal file is truncated or corrupt"),
     (_atr_truncated, "tr.hea", "tr.atr: annotation file is truncated or corrupt"),
     (_format_999, "f999.hea", "f999.dat: signal format 999 (header f999.hea) is not a WFDB"),
     (_segment_missing, "041s/041s.hea",
      "041s02.hea: segment header named by the record header is missing"),
     (_all_gaps, "gap.hea", "the record holds only gaps")],
)  # fmt: skip
def test_bad_records_name_the_file_and_the_cause(mit, tmp_path, make, header, expected):
    make(mit, tmp_path)
    _, got = run(wfdb_spec(tmp_path, [header], annotators=["atr"]))
    ((kind, rel, reason),) = got
    assert kind == "Q" and rel == header and expected in reason, reason
    assert str(tmp_path) not in reason


def test_channel_that_is_a_gap_in_every_segment_is_masked(mit, tmp_path):
    """041s as a variable-layout record whose layout lists lead II, which no segment holds:
    wfdb gives it no unit; it is masked as missing, not refused as 'not a voltage'."""
    d = shutil.copytree(mit / "041s", tmp_path / "041s")
    seg = (d / "041s01.hea").read_text().splitlines()
    layout = [x.replace("041s01.dat", "~") for x in seg[1:8]] + ["~ 0 200/mV 12 0 0 0 0 II"]
    (d / "041s_layout.hea").write_text("\n".join(["041s_layout 8 125 0", *layout]) + "\n")
    (d / "041s.hea").write_text("041s/3 8 125 2000\n041s_layout 0\n041s01 1000\n041s02 1000\n")
    _, got = run(wfdb_spec(tmp_path, ["041s/041s.hea"]))
    ((kind, _, w),) = got
    assert kind == "S" and w.channels[-1] == "II" and w.meta["bad_channels"] == {"II": "nan"}


@pytest.mark.parametrize(
    "unknown, expected",
    [("quarantine", "unknown channel name '#1' (the file gives it no name)"),
     ("drop", "no channel left after channel selection")],
)  # fmt: skip
def test_header_without_names_or_adc_fields(mit, tmp_path, unknown, expected):
    """Signal lines that stop after the resolution (no ADC zero, baseline, names): found by
    bench/fuzz.py as a TypeError; now the nameless leads are unknown channels."""
    hea = derive_100(mit, tmp_path, "sf")
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join([lines[0], "sf.dat 212 200 11", "sf.dat 212 200 11"]) + "\n")
    _, got = run(wfdb_spec(tmp_path, ["sf.hea"], {"unknown_channel": unknown}))
    assert got == [("Q", "sf.hea", expected)]


# ---------------------------------------------------------------- 7. every file of a record


def test_items_hold_and_hash_every_file_a_record_reads(mit, tmp_path):
    derive_100(mit, tmp_path, "100", annotations=True)
    write_detector_annotations(mit, tmp_path, "100", "qrs")
    shutil.copytree(mit / "041s", tmp_path / "041s")
    spec = wfdb_spec(tmp_path, ["**/*.hea"], annotators=["atr", "qrs"])
    items, _ = run(spec)
    by_rel = {it.rel: it for it in items}
    assert set(by_rel) == {"100.hea", "041s/041s.hea"}
    assert [f.rel for f in by_rel["100.hea"].files] == ["100.hea", "100.dat", "100.atr", "100.qrs"]
    multi = [f.rel for f in by_rel["041s/041s.hea"].files]
    assert multi == ["041s/041s.hea"] + [
        f"041s/041s0{i}.{e}" for i in (1, 2) for e in ("hea", "dat")
    ]
    item = by_rel["100.hea"]
    assert item.nbytes == sum((tmp_path / f.rel).stat().st_size for f in item.files)
    assert item.nbytes > (mit / "100.dat").stat().st_size  # the bytes read, not the header's
    src = parse_spec(spec)
    fs, _, _ = list_files(src.sources[0])
    inputs = provenance(item, src, Keyring(KEY), fs)["inputs"]
    assert len(inputs) == 4  # header, signal file and both annotation files are hashed


def test_remote_records_are_fetched_through_their_item(mit):
    """An object store (fsspec memory): the reader fetches exactly the item's files."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for name in ("100.hea", "100.dat", "100.atr"):
        mem.pipe(f"/remote-mit/{name}", (mit / name).read_bytes())
    for p in sorted((mit / "041s").iterdir()):
        mem.pipe(f"/remote-mit/041s/{p.name}", p.read_bytes())
    spec = wfdb_spec(Path("x"), ["**/*.hea"], {"target_rate": None})
    spec["sources"][0]["root"] = "memory://remote-mit"
    try:
        items, got = run(spec)
    finally:
        mem.rm("/remote-mit", recursive=True)
    assert sorted(it.rel for it in items) == ["041s/041s.hea", "100.hea"]
    assert [k for k, _, _ in got] == ["S"] * 181  # 1 window of 041s, 180 of 100
    assert sum(len(s.labels["beats"]) for _, rel, s in got if rel == "100.hea") > 2000


# ---------------------------------------------------------------- 8. companion files


@pytest.mark.parametrize("name", ["r.d0", "r.d9", "100.gqrsh", "100.sqrs", "100.dat", "100.atr",
                                  "s0010_re.xyz", "A00001.mat"])  # fmt: skip
def test_wfdb_companions_are_part_of_their_record(name):
    assert is_companion(name)


def test_wfdb_source_consumes_companions_and_reports_strays(mit, tmp_path):
    derive_100(mit, tmp_path, "100", annotations=True)
    write_detector_annotations(mit, tmp_path, "100", "gqrsh")
    (tmp_path / "notes.txt").write_text("not a record")
    items, got = run(wfdb_spec(tmp_path, ["**/*"], {"target_rate": None}))
    assert [it.rel for it in items] == ["100.hea"]
    quarantined = [(rel, why) for k, rel, why in got if k == "Q"]
    assert quarantined == [("notes.txt", "not a WFDB header, and no header reads it")]


# ---------------------------------------------------------------- 9. per-channel quality


def _with_resp(mit: Path, d: Path, resp: np.ndarray, flat_ecg: bool = False) -> None:
    """Record 100's two leads (first minute) beside a RESP channel."""
    rec = wfdb.rdrecord(str(mit / "100"), sampto=MINUTE)
    ecg = rec.p_signal.copy()
    if flat_ecg:
        ecg[:] = 0.1
    wfdb.wrsamp("resp", fs=360, units=["mV", "mV", "NU"], sig_name=["MLII", "V5", "RESP"],
                p_signal=np.column_stack([ecg, resp]), fmt=["16"] * 3,
                write_dir=str(d))  # fmt: skip


def test_bad_companion_channel_is_masked_not_the_window(mit, tmp_path):
    _with_resp(mit, tmp_path, np.zeros(MINUTE))  # a flat (disconnected) RESP
    _, got = run(wfdb_spec(tmp_path, ["resp.hea"], {"target_rate": None}))
    assert [k for k, _, _ in got] == ["S"] * 6
    w = got[0][2]
    assert w.channels == ["MLII", "V5", "RESP"] and w.meta["bad_channels"] == {"RESP": "flat"}
    assert list(w.extras["mask"]) == [0, 0, 1] and (w.data[2] == 0).all()


def test_window_with_every_wanted_channel_bad_is_quarantined(mit, tmp_path):
    t = np.arange(MINUTE) / 360
    _with_resp(mit, tmp_path, np.sin(2 * np.pi * 0.25 * t), flat_ecg=True)
    _, got = run(wfdb_spec(tmp_path, ["resp.hea"], {"target_rate": None}))
    assert [k for k, _, _ in got] == ["Q"] * 6
    assert "every wanted channel is bad: MLII flat, V5 flat" in got[0][2]


# ---------------------------------------------------------------- 10. smaller defects


def test_eeg_with_one_ecg_channel_is_eeg(tmp_path):
    f = pyedflib.EdfReader(str(EDF_FILES / "test_utf8.edf"))
    eeg, hdr = f.readSignal(0), f.getSignalHeader(0)
    f.close()
    labels = ["EEG Fp1", "EEG Fp2", "EEG C3", "ECG"]
    w = pyedflib.EdfWriter(str(tmp_path / "psg.edf"), 4, file_type=pyedflib.FILETYPE_EDFPLUS)
    w.setSignalHeaders([{**hdr, "label": x} for x in labels])
    w.writeSamples([np.roll(eeg, 7 * i) for i in range(4)])
    w.close()
    _, got = run({"sources": [{"name": "e", "root": str(tmp_path), "format": "edf"}],
                  "signal": {"target_rate": None}})  # fmt: skip
    assert got[0][2].modality == "EEG" and got[0][2].channels == ["Fp1", "Fp2", "C3", "ECG"]


def test_segments_count_data_segments_not_the_layout(mit, tmp_path):
    """041s rewritten as a variable-layout record: layout header + its two real segments."""
    d = shutil.copytree(mit / "041s", tmp_path / "041s")
    seg = (d / "041s01.hea").read_text().splitlines()
    layout = ["041s_layout 7 125 0"] + [x.replace("041s01.dat", "~") for x in seg[1:8]]
    (d / "041s_layout.hea").write_text("\n".join(layout) + "\n")
    (d / "041s.hea").write_text("041s/3 7 125 2000\n041s_layout 0\n041s01 1000\n041s02 1000\n")
    _, got = run(wfdb_spec(tmp_path, ["041s/041s.hea"]))
    ((kind, _, w),) = got
    assert kind == "S" and w.meta["segments"] == 2


def test_settings_record_the_signal_section(mit):
    spec = parse_spec(wfdb_spec(mit, ["100.hea"], {"target_rate": 250, "window_s": 4}))
    settings = spec.settings()
    assert settings["signal"]["target_rate"] == 250
    assert settings["signal"]["window_s"] == 4
    spec_dict = wfdb_spec(mit, ["100.hea"])
    del spec_dict["signal"]
    _, got = run(spec_dict)  # no signal: section: the defaults are recorded
    prov = got[0][2].provenance["settings"]
    assert prov["signal"]["target_rate"] == 500 and "volume" in prov


# ---------------------------------------------------------------- the Ray job, format auto


def _multi_file_record(mit: Path, folder: Path) -> None:
    """Record 100's first ten minutes with one signal file per lead, `m.d0` and `m.d1`."""
    rec = wfdb.rdrecord(str(mit / "100"), physical=False, sampto=10 * MINUTE)
    rec.record_name, rec.file_name, rec.fmt = "m", ["m.d0", "m.d1"], ["16", "16"]
    rec.byte_offset = None
    rec.wrsamp(write_dir=str(folder))


@pytest.mark.slow  # a real Ray job
def test_job_auto_keeps_companions_and_accounts_for_every_input(ray_local, mit, tmp_path):
    import json

    from medfm.ingest.job import run_ingest
    from medfm.shards import ShardSet

    root = tmp_path / "in"
    derive_100(mit, root, "100", annotations=True)
    write_detector_annotations(mit, root, "100", "gqrsh")
    _multi_file_record(mit, root)
    write_detector_annotations(mit, root, "m", "sqrs")
    derive_100(mit, root, "short", record_line="short 2 360 1800")
    spec = parse_spec({
        "sources": [{"name": "a", "root": str(root), "format": "auto",
                     "options": {"annotators": ["atr", "gqrsh", "sqrs"]}}],
        "signal": {"target_rate": 250}, "deid": {"hash_paths": False},
    })  # fmt: skip
    out = tmp_path / "out"
    summary = run_ingest(spec, str(out), progress=False, keyring=Keyring(KEY))
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    quarantined = {json.loads(x)["path"]: json.loads(x)["reason"] for x in lines}
    assert set(quarantined) == {"short.hea", "short.dat"}, quarantined  # no companion is refused
    assert "shorter than one window" in quarantined["short.hea"]
    paths = {json.loads(r["provenance"])["path"] for r in ShardSet(str(out)).rows()}
    assert paths == {"100.hea", "m.hea"}
    # m holds the same samples as 100: the job keeps one copy of each window
    assert summary.written + summary.duplicates == 120 and summary.quarantined == 2
    assert summary.bytes_in == sum(p.stat().st_size for p in root.iterdir())  # every file read
    prov = json.loads(next(iter(ShardSet(str(out)).rows()))["provenance"])
    assert len(prov["inputs"]) == 4  # 100: hea, dat, atr, gqrsh / m: hea, d0, d1, sqrs
