"""Signal readers: WFDB (incl. multi-segment and annotations), EDF/EDF+/BDF, DICOM waveforms,
CSV. Each returns a `SignalRecord` in physical units and copies no free-text header field.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import resample_poly

from .record import SignalReadError, SignalRecord

# wfdb's beat annotation symbols (MIT-BIH convention); every other symbol is a non-beat label.
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
# Bytes per sample of the uncompressed WFDB formats, to catch truncated .dat files before wfdb
# (which fails on them with a bare numpy broadcast error).
WFDB_BYTES_PER_SAMPLE = {
    "8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3,
    "311": 4 / 3,
}  # fmt: skip


@dataclass
class ReaderOptions:
    """Reader settings that come from the spec rather than the file."""

    annotators: list[str] = field(default_factory=lambda: ["atr"])  # WFDB annotation extensions
    dicom_group: str = "RHYTHM"  # DICOM multiplex group label to read (else the first group)
    csv_fs: float | None = None  # sampling rate a CSV file cannot declare itself
    csv_units: str = "mV"
    csv_columns: list[str] = field(default_factory=list)  # required; empty = all but time
    csv_time_column: str | None = "time"


def to_common_rate(chans: list[np.ndarray], rates: list[float]) -> tuple[np.ndarray, float]:
    """Bring channels sampled at different rates to the highest one (polyphase, integer ratio)."""
    top = max(rates)
    out = []
    for x, r in zip(chans, rates, strict=True):
        if r != top:
            up, down = _ratio(top, r)
            x = resample_poly(x, up, down)
        out.append(x)
    n = min(len(x) for x in out)
    return np.stack([x[:n] for x in out]).astype(np.float64), float(top)


def _msg(e: BaseException) -> str:
    """A library's error message without file paths (folder names can be PHI)."""
    from ..tasks import scrub

    return scrub(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _ratio(top: float, r: float) -> tuple[int, int]:
    from fractions import Fraction

    f = Fraction(top / r).limit_denominator(1000)
    return f.numerator, f.denominator


# --- WFDB -----------------------------------------------------------------------------------


def check_wfdb_sizes(record_path: str) -> int:
    """Raise if any .dat file is shorter than its header says (truncated or over-declared);
    returns the number of segments."""
    import wfdb

    header = wfdb.rdheader(record_path)
    folder = os.path.dirname(record_path)
    headers = [header]
    if isinstance(header, wfdb.MultiRecord):
        headers = [
            wfdb.rdheader(os.path.join(folder, s)) for s in header.seg_name if s and s != "~"
        ]
    for h in headers:
        per_file: dict[str, float] = {}
        for i, fname in enumerate(h.file_name):
            bps = WFDB_BYTES_PER_SAMPLE.get(str(h.fmt[i]))
            if bps is None:  # compressed formats: wfdb checks them itself
                continue
            offset = (h.byte_offset[i] or 0) if h.byte_offset else 0
            spf = h.samps_per_frame[i] if h.samps_per_frame else 1
            per_file[fname] = per_file.get(fname, offset) + bps * spf * h.sig_len
        for fname, need in per_file.items():
            path = os.path.join(folder, fname)
            if not os.path.exists(path):
                raise SignalReadError(f"{fname}: signal file named by the header is missing")
            have = os.path.getsize(path)
            if have < int(need):
                raise SignalReadError(
                    f"{fname}: holds {have} bytes but the header declares {h.sig_len} samples "
                    f"needing {int(need)} bytes (truncated file or over-declared length)"
                )
    return len(headers)


def read_wfdb(path: str, opts: ReaderOptions) -> SignalRecord:
    """A WFDB record (`.hea` path), single- or multi-segment, with its annotation files."""
    import wfdb

    record_path = path[:-4] if path.endswith(".hea") else path
    segments = check_wfdb_sizes(record_path)
    try:
        rec = wfdb.rdrecord(record_path, smooth_frames=False)
    except (ValueError, OSError, IndexError) as e:
        raise SignalReadError(f"{os.path.basename(path)}: wfdb cannot read it ({_msg(e)})") from e
    spf = rec.samps_per_frame or [1] * rec.n_sig
    rates = [rec.fs * s for s in spf]
    signal, fs = to_common_rate([np.asarray(x, float) for x in rec.e_p_signal], rates)
    start = (
        dt.datetime.combine(rec.base_date, rec.base_time or dt.time())
        if rec.base_date is not None
        else None
    )
    phys = _wfdb_phys_range(rec)
    out = SignalRecord(signal, fs, list(rec.sig_name), list(rec.units), start, phys, format="wfdb")
    out.segments = segments
    scale = fs / rec.fs  # annotations count frames; channels at spf > 1 count faster
    for ext in opts.annotators:
        if os.path.exists(f"{record_path}.{ext}"):
            _add_wfdb_annotations(out, wfdb.rdann(record_path, ext), scale)
    return out


def _wfdb_phys_range(rec) -> list[tuple[float, float]] | None:
    """Physical values at the ADC limits (single-segment records only; None otherwise)."""
    if not rec.adc_gain or not rec.adc_res or rec.baseline is None or rec.adc_zero is None:
        return None
    out = []
    for gain, res, zero, base in zip(
        rec.adc_gain, rec.adc_res, rec.adc_zero, rec.baseline, strict=True
    ):
        if not gain or not res:
            return None
        # The lowest code is WFDB's "invalid sample" marker (read as NaN), so it is excluded.
        lo, hi = zero - 2 ** (res - 1) + 1, zero + 2 ** (res - 1) - 1
        out.append(((lo - base) / gain, (hi - base) / gain))
    return out


def _add_wfdb_annotations(out: SignalRecord, ann, scale: float) -> None:
    samples = np.round(np.asarray(ann.sample, np.int64) * scale).astype(np.int64)
    symbols = list(ann.symbol)
    aux = [str(a or "").replace("\x00", "").strip() for a in (ann.aux_note or [""] * len(symbols))]
    beat = np.array([s in BEAT_SYMBOLS for s in symbols], bool)
    out.beats = np.concatenate([out.beats, samples[beat]])
    out.beat_symbols += [s for s, b in zip(symbols, beat, strict=True) if b]
    # Rhythm changes are '+' annotations whose aux note is "(AFIB" etc.; an episode lasts until
    # the next change or the end of the record.
    changes = [
        (int(t), a.lstrip("("))
        for t, s, a in zip(samples, symbols, aux, strict=True)
        if s == "+" and a
    ]
    ends = [t for t, _ in changes[1:]] + [out.signal.shape[1]]
    out.rhythms += [(t, end, label) for (t, label), end in zip(changes, ends, strict=True)]


# --- EDF / EDF+ / BDF -----------------------------------------------------------------------


def read_edf(path: str, opts: ReaderOptions) -> SignalRecord:
    """EDF, EDF+ or BDF with annotations; header identity fields are never read out."""
    import pyedflib

    try:
        f = pyedflib.EdfReader(path)
    except OSError as e:
        raise SignalReadError(
            f"{os.path.basename(path)}: not a readable EDF/BDF ({_msg(e)})"
        ) from None
    try:
        idx = list(range(f.signals_in_file))
        if not idx:
            raise SignalReadError(f"{os.path.basename(path)}: no signals")
        chans = [f.readSignal(i) for i in idx]
        rates = [float(f.getSampleFrequency(i)) for i in idx]
        signal, fs = to_common_rate(chans, rates)
        onsets, durations, texts = f.readAnnotations()
        return SignalRecord(
            signal,
            fs,
            [f.getLabel(i) for i in idx],
            [f.getPhysicalDimension(i) for i in idx],
            f.getStartdatetime(),
            [(f.getPhysicalMinimum(i), f.getPhysicalMaximum(i)) for i in idx],
            events=[
                (float(o), max(float(d), 0.0), str(t))
                for o, d, t in zip(onsets, durations, texts, strict=True)
            ],
            format="edf",
        )
    finally:
        f.close()


# --- DICOM waveform -------------------------------------------------------------------------


def read_dicom_waveform(path: str, opts: ReaderOptions) -> SignalRecord:
    """A DICOM waveform object (12-lead ECG etc.); reads one multiplex group."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = os.path.basename(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as e:
        raise SignalReadError(f"{name}: not a readable DICOM file ({_msg(e)})") from e
    groups = ds.get("WaveformSequence")
    if not groups:
        raise SignalReadError(f"{name}: DICOM object has no WaveformSequence")
    labels = [str(g.get("MultiplexGroupLabel", "")) for g in groups]
    index = labels.index(opts.dicom_group) if opts.dicom_group in labels else 0
    group = groups[index]
    arr = ds.waveform_array(index).T.astype(np.float64)  # sensitivity and baseline applied
    chans, units = [], []
    for c in group.ChannelDefinitionSequence:
        chans.append(str(c.ChannelSourceSequence[0].CodeMeaning))
        units.append(str(c.ChannelSensitivityUnitsSequence[0].CodeValue))
    return SignalRecord(
        arr, float(group.SamplingFrequency), chans, units, _dicom_start(ds), format="dicom"
    )


def _dicom_start(ds) -> dt.datetime | None:
    from pydicom.valuerep import DA, DT, TM

    if ds.get("AcquisitionDateTime"):
        v = DT(ds.AcquisitionDateTime)
        return v.replace(tzinfo=None)
    if ds.get("ContentDate"):
        day = DA(ds.ContentDate)
        t = TM(ds.ContentTime) if ds.get("ContentTime") else dt.time()
        return dt.datetime.combine(day, t)
    return None


# --- CSV ------------------------------------------------------------------------------------


def read_csv_signal(path: str, opts: ReaderOptions) -> SignalRecord:
    """A CSV with one column per channel (header row) and a sampling rate from the spec."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    name = os.path.basename(path)
    if not opts.csv_fs:
        raise SignalReadError(f"{name}: CSV signals need a declared sampling rate (csv_fs)")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SignalReadError(f"{name}: not UTF-8 (bad byte at offset {e.start})") from e
    try:
        table = pacsv.read_csv(io.BytesIO(raw))
    except pa.ArrowInvalid as e:
        raise SignalReadError(f"{name}: malformed CSV ({_msg(e)})") from e
    columns = list(opts.csv_columns) or [c for c in table.column_names if c != opts.csv_time_column]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SignalReadError(f"{name}: missing column(s) {missing}")
    try:
        signal = np.stack([table[c].to_numpy(zero_copy_only=False).astype(float) for c in columns])
    except (ValueError, TypeError) as e:
        raise SignalReadError(f"{name}: non-numeric values in a channel column ({_msg(e)})") from e
    return SignalRecord(
        signal, float(opts.csv_fs), columns, [opts.csv_units] * len(columns), format="csv"
    )


SignalReaderFn = Callable[[str, ReaderOptions], SignalRecord]
