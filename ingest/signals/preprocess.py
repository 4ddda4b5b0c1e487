"""Signal preprocessing: canonical channels and units, polyphase resampling, fixed windows,
per-channel normalization and quality checks (flat line, NaN, saturation).

Quality is judged on the native-rate samples (a NaN or a clipped sample is a fact about the
file, not about the resampled signal), and flat lines on the resampled window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from .channels import GROUP_UNIT, canonical_name, channel_group, unit_factor
from .record import SignalReadError, SignalRecord

# Flat line = per-channel standard deviation below this, in the group's target unit
# (1 µV for ECG in mV, 0.1 µV for EEG in µV).
DEFAULT_FLAT_STD = {"ecg": 1e-3, "eeg": 0.1, "other": 1e-6}


@dataclass
class SignalConfig:
    """Preprocessing settings (spec key `signal:`); defaults suit 12-lead ECG pretraining."""

    target_rate: float | None = 500.0  # Hz; None keeps each record's own rate
    window_s: float = 10.0
    overlap: float = 0.0  # fraction of a window shared with the next, in [0, 1)
    groups: list[str] = field(default_factory=lambda: ["ecg", "eeg", "other"])  # groups to keep
    channels: list[str] = field(default_factory=list)  # canonical names, in order; empty = all
    unknown_channel: str = "quarantine"  # or "drop": what an unrecognised channel name does
    normalize: str = "window"  # "window" | "record" | "none"; stats kept in extras["norm"]
    # A bad channel is always masked (zeroed, extras["mask"], meta.bad_channels) and its window
    # kept; a window whose every wanted channel is bad is quarantined, or kept with "mask".
    bad_window: str = "quarantine"  # "quarantine" | "mask"
    flat_std: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FLAT_STD))
    max_saturated: float = 0.05  # fraction of samples at the ADC limits that marks saturation
    max_nan: float = 0.005  # missing-sample fraction above which a channel is bad; fewer are
    # linearly interpolated (and counted in meta["interpolated"])
    keep_events: bool = True  # copy EDF+ annotation texts into labels (set False if free text)
    # Never upsample by more than this: a slower channel beside waveforms is dropped (and
    # named in meta.dropped_reasons), a slower record is refused.
    max_resample_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"signal.overlap must be in [0, 1), got {self.overlap}")
        if self.window_s <= 0:
            raise ValueError(f"signal.window_s must be positive, got {self.window_s}")
        if self.max_resample_ratio < 1:
            ratio = self.max_resample_ratio
            raise ValueError(f"signal.max_resample_ratio must be >= 1, got {ratio}")
        for name, value, allowed in (
            ("unknown_channel", self.unknown_channel, ("quarantine", "drop")),
            ("normalize", self.normalize, ("window", "record", "none")),
            ("bad_window", self.bad_window, ("quarantine", "mask")),
        ):
            if value not in allowed:
                raise ValueError(f"signal.{name} must be one of {allowed}, got {value!r}")


@dataclass
class Window:
    """One fixed-length window ready to become a `signal` sample."""

    index: int
    start: int  # first sample, at the output rate
    data: np.ndarray  # (C, T) float32
    labels: dict
    extras: dict[str, np.ndarray]
    bad: dict[str, str]  # channel -> reason (flat, nan, saturated)
    interpolated: int  # missing samples filled by interpolation (native rate)


@dataclass
class Prepared:
    """A record after channel mapping, unit conversion and resampling."""

    signal: np.ndarray  # (C, T) float32 at `fs`
    fs: float
    channels: list[str]
    units: list[str]
    nan: np.ndarray  # (C, T_native) bool
    saturated: np.ndarray  # (C, T_native) bool
    native_fs: float
    dropped: list[str]


def map_channels(rec: SignalRecord, cfg: SignalConfig) -> tuple[list[int], list[str], list[str]]:
    """(indices, canonical names, dropped raw names) of the channels to keep."""
    keep, names, dropped = [], [], []
    for i, raw in enumerate(rec.channels):
        name = canonical_name(raw)
        if name is None:
            label = raw.strip() or f"#{i + 1}"
            if cfg.unknown_channel == "quarantine":
                why = "not in vocabulary" if raw.strip() else "the file gives it no name"
                raise SignalReadError(f"unknown channel name {label!r} ({why})")
            dropped.append(label)
            continue
        if channel_group(name) not in cfg.groups or (cfg.channels and name not in cfg.channels):
            dropped.append(name)
            continue
        if name in names:
            raise SignalReadError(f"channel {name} appears twice")
        keep.append(i)
        names.append(name)
    if cfg.channels:
        missing = [c for c in cfg.channels if c not in names]
        if missing:
            raise SignalReadError(f"required channel(s) {missing} missing")
        order = [names.index(c) for c in cfg.channels]
        keep, names = [keep[j] for j in order], [names[j] for j in order]
    if not keep:
        raise SignalReadError("no channel left after channel selection")
    return keep, names, dropped


def primary_group(channels: list[str]) -> str:
    """The record's own kind: ECG or EEG, whichever has more channels (ECG on a tie; an EEG
    montage with one ECG lead is EEG), else "other"."""
    groups = [channel_group(c) for c in channels]
    ecg, eeg = groups.count("ecg"), groups.count("eeg")
    return "ecg" if ecg and ecg >= eeg else "eeg" if eeg else "other"


def wanted_channels(channels: list[str], cfg: SignalConfig) -> list[str]:
    """The channels a window is for: the spec's `channels`, else those of the primary group
    (a bad RESP beside good ECG leads costs the RESP, not the window)."""
    if cfg.channels:
        return list(cfg.channels)
    group = primary_group(channels)
    return [c for c in channels if channel_group(c) == group]


def check_rate(rec: SignalRecord, cfg: SignalConfig) -> float:
    """The output rate, refusing an upsampling beyond `max_resample_ratio`."""
    fs = float(cfg.target_rate or rec.fs)
    if fs / rec.fs > cfg.max_resample_ratio:
        raise SignalReadError(
            f"sampled at {rec.fs:g} Hz: target_rate {fs:g} Hz would upsample it "
            f"{fs / rec.fs:g}x (max_resample_ratio {cfg.max_resample_ratio:g}); numerics "
            "records (HR, SpO2 once a minute) belong in a spec with signal.target_rate: null"
        )
    return fs


def prepare(rec: SignalRecord, cfg: SignalConfig) -> Prepared:
    """Select and rename channels, convert to mV/µV, flag NaN/saturation, resample."""
    fs = check_rate(rec, cfg)
    idx, names, dropped = map_channels(rec, cfg)
    # float32 throughout, as stored: resample_poly runs a third faster than in float64, and
    # its rounding (1e-7 relative) is the storage's own.
    x = rec.signal[idx].astype(np.float32)
    units = []
    for row, (name, i) in enumerate(zip(names, idx, strict=True)):
        target = GROUP_UNIT.get(channel_group(name))
        unit = rec.units[i] or ""
        factor = unit_factor(unit, target) if target else 1.0
        if factor is None and not np.isfinite(x[row]).any():
            factor = 1.0  # a channel that is a gap throughout has no unit; its windows are "nan"
        if factor is None:
            raise SignalReadError(f"channel {name}: unit {unit!r} is not a voltage")
        x[row] *= factor
        units.append(target or unit)
    nan = ~np.isfinite(x)
    saturated = np.zeros_like(nan)
    if rec.phys_range is not None:
        for row, i in enumerate(idx):
            lo, hi = rec.phys_range[i]
            lo, hi = sorted(
                (lo * _factor(units[row], rec.units[i]), hi * _factor(units[row], rec.units[i]))
            )
            tol = 1e-3 * (hi - lo)
            saturated[row] = (x[row] <= lo + tol) | (x[row] >= hi - tol)
    x = fill_gaps(x, nan)  # resample_poly would smear a NaN over the whole filter length
    if fs != rec.fs:
        ratio = Fraction(fs / rec.fs).limit_denominator(10000)
        x = resample_poly(x, ratio.numerator, ratio.denominator, axis=1)
    return Prepared(x, fs, names, units, nan, saturated, rec.fs, dropped)


def fill_gaps(x: np.ndarray, nan: np.ndarray) -> np.ndarray:
    """Linearly interpolate missing samples per channel (all-missing channels become 0)."""
    for row in np.flatnonzero(nan.any(axis=1)):
        good = ~nan[row]
        if good.any():
            x[row, ~good] = np.interp(np.flatnonzero(~good), np.flatnonzero(good), x[row, good])
        else:
            x[row] = 0.0
    return x


def _factor(target_unit: str, unit: str) -> float:
    return unit_factor(unit or "", target_unit) or 1.0


def window_starts(n: int, fs: float, cfg: SignalConfig) -> list[int]:
    size = int(round(cfg.window_s * fs))
    step = max(1, int(round(size * (1 - cfg.overlap))))
    return list(range(0, n - size + 1, step)) if n >= size else []


# Windows are cut, checked and normalized in blocks of this many float32 values (16 MB): numpy
# works on a block at once (no per-window calls), and the temporaries stay bounded on day-long
# records.
BLOCK_VALUES = 1 << 22
REASONS = ("", "nan", "saturated", "flat")  # codes of `block_quality`


def block_quality(
    p: Prepared, starts: np.ndarray, size: int, std: np.ndarray, cfg: SignalConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(reason codes (windows, channels) into REASONS, interpolated samples per window) of the
    windows [start, start + size); `std` is each window's per-channel standard deviation."""
    scale = p.native_fs / p.fs
    n_native = p.nan.shape[1]
    a = (starts * scale).astype(np.int64)
    b = np.maximum(a + 1, np.rint((starts + size) * scale).astype(np.int64))
    a_in, b_in = np.minimum(a, n_native), np.minimum(b, n_native)  # what a slice would hold
    missing = _counts(p.nan, a_in, b_in)
    nan_bad = missing > cfg.max_nan * (b - a)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty slice: never saturated
        saturated = _counts(p.saturated, a_in, b_in) / (b_in - a_in)[:, None]
    sat_bad = ~nan_bad & (saturated > cfg.max_saturated)
    flat_std = [cfg.flat_std.get(channel_group(c), DEFAULT_FLAT_STD["other"]) for c in p.channels]
    flat_bad = ~nan_bad & ~sat_bad & (std < np.asarray(flat_std))
    codes = np.select([nan_bad, sat_bad, flat_bad], [1, 2, 3], 0)
    return codes, np.where(nan_bad, 0, missing).sum(axis=1)


def _counts(flags: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(windows, channels): how many of flags[c, a[w]:b[w]] are set, by cumulative sums."""
    if not flags.any():  # the usual case: no gap, no clipping
        return np.zeros((len(a), flags.shape[0]), np.int64)
    cum = np.zeros((flags.shape[0], flags.shape[1] + 1), np.int64)
    np.cumsum(flags, axis=1, out=cum[:, 1:])
    return (cum[:, b] - cum[:, a]).T


def windows(rec: SignalRecord, p: Prepared, cfg: SignalConfig) -> list[Window]:
    """Cut, quality-check, normalize and label every full window of a prepared record."""
    size = int(round(cfg.window_s * p.fs))
    scale = p.fs / rec.fs
    beats = np.round(rec.beats * scale).astype(np.int64)
    starts = np.asarray(window_starts(p.signal.shape[1], p.fs, cfg), np.int64)
    if not len(starts):
        return []
    rec_stats = _stats(p.signal) if cfg.normalize == "record" else None
    # (windows, channels, size) without a copy; indexing a block of it copies that block.
    view = np.lib.stride_tricks.sliding_window_view(p.signal, size, axis=1).transpose(1, 0, 2)
    per_block = max(1, BLOCK_VALUES // (size * len(p.channels)))
    out = []
    for first in range(0, len(starts), per_block):
        block = starts[first : first + per_block]
        x = view[block]
        std = x.std(axis=2)
        codes, filled = block_quality(p, block, size, std, cfg)
        mask = codes > 0
        x[mask] = 0.0
        norm = None
        if cfg.normalize != "none":
            if rec_stats is None:
                mean, std = x.mean(axis=2), np.where(std > 1e-12, std, 1.0)
            else:
                mean, std = rec_stats
            mean, std = np.where(mask, 0.0, mean), np.where(mask, 1.0, std)
            x = (x - mean[..., None]) / std[..., None]
            norm = np.stack([mean, std], axis=1).astype(np.float32)  # (windows, 2, channels)
        data = x.astype(np.float32, copy=False)  # a block's own copy already
        for j, s in enumerate(block.tolist()):
            extras: dict[str, np.ndarray] = {} if norm is None else {"norm": norm[j]}
            bad = {c: REASONS[k] for c, k in zip(p.channels, codes[j].tolist(), strict=True) if k}
            if bad:
                extras["mask"] = mask[j].astype(np.uint8)
            labels, label_extras = window_labels(rec, beats, scale, s, size, p.fs, cfg)
            extras.update(label_extras)
            out.append(Window(first + j, s, data[j], labels, extras, bad, int(filled[j])))
    return out


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    return mean, np.where(std > 1e-12, std, 1.0)


def window_labels(
    rec: SignalRecord,
    beats: np.ndarray,
    scale: float,
    start: int,
    size: int,
    fs: float,
    cfg: SignalConfig,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Beat labels, rhythm episodes and EDF+ events that fall in the window, window-relative."""
    labels: dict = {}
    extras: dict[str, np.ndarray] = {}
    end = start + size
    if len(rec.beat_symbols):
        sel = np.flatnonzero((beats >= start) & (beats < end))
        symbols = [rec.beat_symbols[j] for j in sel]
        labels["beats"] = symbols
        labels["beat_counts"] = {s: symbols.count(s) for s in sorted(set(symbols))}
        extras["beat_idx"] = (beats[sel] - start).astype(np.int32)
    if rec.rhythms:
        episodes = []
        for a, b, label in rec.rhythms:
            a, b = int(round(a * scale)), int(round(b * scale))
            if a < end and b > start:
                episodes.append([max(a, start) - start, min(b, end) - start, label])
        labels["rhythm"] = episodes
        labels["rhythms"] = sorted({e[2] for e in episodes})
    if rec.events and cfg.keep_events:
        t0, t1 = start / fs, end / fs
        labels["events"] = [
            [round(o - t0, 6), round(d, 6), text]
            for o, d, text in rec.events
            if o < t1 and o + d >= t0
        ]
    return labels, extras
