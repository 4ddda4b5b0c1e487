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


# Upsampling factor beyond which a channel is not brought to the record's rate: a 1/60 Hz
# numeric (HR, SpO2) upsampled to a 500 Hz waveform rate is 30,000 invented samples per
# measured one (spec `signal.max_resample_ratio`).
DEFAULT_MAX_RATIO = 10.0


@dataclass
class CommonRate:
    """Channels brought to one rate, and the ones left out because that needed too much."""

    signal: np.ndarray  # (C, T) float32
    fs: float
    kept: list[int]  # indices into the input channels
    dropped: dict[int, str]  # input index -> why


def to_common_rate(
    chans: list[np.ndarray], rates: list[float], max_ratio: float = DEFAULT_MAX_RATIO
) -> CommonRate:
    """Bring channels sampled at different rates to the highest one (polyphase, integer ratio).

    A channel more than `max_ratio` times slower than the fastest (a numeric beside waveforms)
    is dropped with its reason rather than upsampled."""
    top = max(rates)
    out, kept, dropped = [], [], {}
    for i, (x, r) in enumerate(zip(chans, rates, strict=True)):
        if top / r > max_ratio:
            dropped[i] = (
                f"sampled at {r:g} Hz, {top / r:g}x below the record's {top:g} Hz "
                f"(max_resample_ratio {max_ratio:g}): not upsampled"
            )
            continue
        if r != top:
            up, down = _ratio(top, r)
            x = resample_poly(x, up, down)
        out.append(x)
        kept.append(i)
    n = min(len(x) for x in out)
    signal = np.stack([x[:n] for x in out]).astype(np.float32, copy=False)
    return CommonRate(signal, float(top), kept, dropped)


def _msg(e: BaseException) -> str:
    """A library's error message without file paths (folder names can be PHI)."""
    from ..bookkeeping import scrub_reason

    return scrub_reason(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _ratio(top: float, r: float) -> tuple[int, int]:
    from fractions import Fraction

    f = Fraction(top / r).limit_denominator(1000)
    return f.numerator, f.denominator


# --- WFDB -----------------------------------------------------------------------------------


def _rdheader(record_path: str, what: str):
    import wfdb

    name = os.path.basename(record_path) + ".hea"
    if not os.path.exists(record_path + ".hea"):
        raise SignalReadError(f"{name}: {what} is missing")
    try:
        return wfdb.rdheader(record_path)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise SignalReadError(f"{name}: malformed WFDB header ({_msg(e)})") from e


def check_wfdb_sizes(record_path: str) -> int:
    """Raise, naming the file and the cause, for what wfdb reports badly: a missing segment
    header, an unknown signal format, a .dat file shorter than its header says (truncated or
    over-declared). Returns the number of data segments (layout and gap segments excluded)."""
    import wfdb
    from wfdb.io._signal import DAT_FMTS

    header = _rdheader(record_path, "record header")
    folder = os.path.dirname(record_path)
    headers = [header]
    if isinstance(header, wfdb.MultiRecord):
        named = [
            (s, n) for s, n in zip(header.seg_name, header.seg_len, strict=True) if s and s != "~"
        ]
        headers = [
            _rdheader(os.path.join(folder, s), "segment header named by the record header")
            for s, _ in named
        ]
        # A variable-layout record's first segment (length 0) only lists the channels.
        n_segments = sum(1 for _, n in named if n)
        if not n_segments:
            raise SignalReadError(
                f"{header.record_name}.hea: the record holds only gaps (no data segment)"
            )
    else:
        n_segments = 1
    for h in headers:
        per_file: dict[str, float] = {}
        for i, fname in enumerate(h.file_name or []):
            fmt = str(h.fmt[i])
            if fname == "~":  # a layout segment's channel list: no file
                continue
            if fmt not in DAT_FMTS:
                raise SignalReadError(
                    f"{fname}: signal format {fmt} (header {h.record_name}.hea) is not a WFDB "
                    f"format ({', '.join(DAT_FMTS)})"
                )
            bps = WFDB_BYTES_PER_SAMPLE.get(fmt)
            if bps is None or h.sig_len is None:
                # Compressed formats: wfdb checks them itself; no sample count in the header:
                # wfdb takes the length from the file, so there is nothing to disagree with.
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
    return n_segments


def read_wfdb(path: str, opts: ReaderOptions, max_ratio: float = DEFAULT_MAX_RATIO) -> SignalRecord:
    """A WFDB record (`.hea` path), single- or multi-segment, with its annotation files."""
    import wfdb
    from soundfile import LibsndfileError

    record_path = path[:-4] if path.endswith(".hea") else path
    name = os.path.basename(path)
    segments = check_wfdb_sizes(record_path)
    try:
        # float32 physical values: what is stored, and half the memory traffic of float64
        rec = wfdb.rdrecord(record_path, smooth_frames=False, return_res=32)
    except LibsndfileError as e:  # FLAC formats 508/516/524
        header = wfdb.rdheader(record_path)
        files = ", ".join(sorted(set(getattr(header, "file_name", None) or []))) or name
        raise SignalReadError(
            f"{files}: FLAC-compressed signal file is truncated or corrupt ({_msg(e)})"
        ) from e
    except (ValueError, OSError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise SignalReadError(f"{name}: wfdb cannot read it ({_msg(e)})") from e
    chans = [np.asarray(x, np.float32) for x in rec.e_p_signal]
    if not any(np.isfinite(x).any() for x in chans):
        raise SignalReadError(f"{name}: the record holds only gaps (no channel has a sample)")
    spf = rec.samps_per_frame or [1] * rec.n_sig
    common = to_common_rate(chans, [rec.fs * s for s in spf], max_ratio)
    start = (
        dt.datetime.combine(rec.base_date, rec.base_time or dt.time())
        if rec.base_date is not None
        else None
    )
    phys = _wfdb_phys_range(rec)
    k = common.kept
    out = SignalRecord(
        common.signal,
        common.fs,
        [rec.sig_name[i] or "" for i in k],  # a header may leave names and units out
        [rec.units[i] or "" for i in k],
        start,
        [phys[i] for i in k] if phys else None,
        format="wfdb",
        rate_dropped={rec.sig_name[i] or f"#{i + 1}": why for i, why in common.dropped.items()},
    )
    out.segments = segments
    scale = common.fs / rec.fs  # annotations count frames; channels at spf > 1 count faster
    for ext in opts.annotators:
        if os.path.exists(f"{record_path}.{ext}"):
            _add_wfdb_annotations(out, _rdann(record_path, ext), scale)
    return out


def _rdann(record_path: str, ext: str):
    import wfdb

    try:
        return wfdb.rdann(record_path, ext)
    except (ValueError, IndexError, KeyError, TypeError, OSError) as e:
        raise SignalReadError(
            f"{os.path.basename(record_path)}.{ext}: annotation file is truncated or corrupt "
            f"({_msg(e)})"
        ) from e


def _wfdb_phys_range(rec) -> list[tuple[float, float]] | None:
    """Physical values at the ADC limits (single-segment records only; None otherwise)."""
    if not rec.adc_gain or not rec.adc_res or rec.baseline is None or rec.adc_zero is None:
        return None
    out = []
    for gain, res, zero, base in zip(
        rec.adc_gain, rec.adc_res, rec.adc_zero, rec.baseline, strict=True
    ):
        # A header may leave a field out (or, corrupt, declare 2 ** a huge resolution).
        if not gain or zero is None or base is None or not 0 < (res or 0) <= 64:
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
    # Several annotators (atr + qrs) interleave: keep the beats in time order.
    beats = np.concatenate([out.beats, samples[beat]])
    beat_symbols = out.beat_symbols + [s for s, b in zip(symbols, beat, strict=True) if b]
    order = np.argsort(beats, kind="stable")
    out.beats, out.beat_symbols = beats[order], [beat_symbols[j] for j in order]
    # Rhythm changes are '+' annotations whose aux note is "(AFIB" etc.; an episode lasts until
    # the next change or the end of the record. Detector output (qrs, gqrsh, sqrs) has none.
    changes = [
        (int(t), a.lstrip("("))
        for t, s, a in zip(samples, symbols, aux, strict=True)
        if s == "+" and a
    ]
    ends = [t for t, _ in changes[1:]] + [out.signal.shape[1]]
    out.rhythms += [(t, end, label) for (t, label), end in zip(changes, ends[: len(changes)],
                                                                 strict=True)]  # fmt: skip


# --- EDF / EDF+ / BDF -----------------------------------------------------------------------


def read_edf(path: str, opts: ReaderOptions, max_ratio: float = DEFAULT_MAX_RATIO) -> SignalRecord:
    """EDF, EDF+ or BDF with annotations; header identity fields are never read out."""
    import pyedflib

    try:
        f = pyedflib.EdfReader(path)
    except OSError as e:
        raise SignalReadError(
            f"{os.path.basename(path)}: not a readable EDF or BDF file ({_msg(e)})"
        ) from None
    try:
        idx = list(range(f.signals_in_file))
        if not idx:
            raise SignalReadError(f"{os.path.basename(path)}: no signals")
        chans = [f.readSignal(i) for i in idx]
        rates = [float(f.getSampleFrequency(i)) for i in idx]
        common = to_common_rate(chans, rates, max_ratio)
        onsets, durations, texts = f.readAnnotations()
        k = common.kept
        return SignalRecord(
            common.signal,
            common.fs,
            [f.getLabel(i) for i in k],
            [f.getPhysicalDimension(i) for i in k],
            f.getStartdatetime(),
            [(f.getPhysicalMinimum(i), f.getPhysicalMaximum(i)) for i in k],
            events=[
                (float(o), max(float(d), 0.0), str(t))
                for o, d, t in zip(onsets, durations, texts, strict=True)
            ],
            format="edf",
            rate_dropped={f.getLabel(i): why for i, why in common.dropped.items()},
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
