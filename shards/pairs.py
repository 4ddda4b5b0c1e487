"""Cross-modal pairs: samples of two shard sets that belong to the same (pseudonymized) patient,
optionally close in (shifted) time. Image <-> EHR, ECG <-> EHR, image <-> ECG.

Every modality's ingest uses the same keyed patient pseudonym and the same per-patient date
shift, so a join on `patient_id` links them and time gaps between samples are real gaps.
A sample's time span comes from its manifest `meta`: `time` (a point, signals), `time_start` /
`time_end` (EHR sequences) or `dicom.StudyDate` (the whole study day, imaging).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .manifest import Manifest

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH = dt.datetime(1970, 1, 1)


def parse_window(text: str) -> float:
    """'30d', '12h', '90m', '3600s' or '3600' -> seconds."""
    m = _WINDOW.match(text or "")
    if not m:
        raise ValueError(f"invalid time window {text!r}: use a number with s, m, h, d or w")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _seconds(iso: str) -> float:
    when = dt.datetime.fromisoformat(iso)
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return (when - _EPOCH).total_seconds()


def time_span(meta: dict[str, Any]) -> tuple[float, float] | None:
    """(start, end) in seconds of a sample's shifted time, or None if it carries no time."""
    try:
        if meta.get("time_start"):
            start = _seconds(meta["time_start"])
            return start, _seconds(meta.get("time_end") or meta["time_start"])
        if meta.get("time"):
            t = _seconds(meta["time"])
            return t, t
        date = (meta.get("dicom") or {}).get("StudyDate") or (meta.get("dicom") or {}).get(
            "SeriesDate"
        )
        if date and len(date) >= 8 and date[:8].isdigit():
            day = dt.datetime(int(date[:4]), int(date[4:6]), int(date[6:8]))
            start = (day - _EPOCH).total_seconds()
            return start, start + 86400 - 1
    except (ValueError, TypeError):
        return None
    return None


@dataclass
class _Side:
    keys: list[str]
    patients: list[str]
    splits: list[str]
    spans: list[tuple[float, float] | None]

    @classmethod
    def load(cls, root: str) -> _Side:
        t = Manifest.open(root).table.select(["key", "patient_id", "split", "meta"])
        metas = [json.loads(m) for m in t.column("meta").to_pylist()]
        return cls(
            t.column("key").to_pylist(),
            t.column("patient_id").to_pylist(),
            t.column("split").to_pylist(),
            [time_span(m) for m in metas],
        )

    def by_patient(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.patients):
            out.setdefault(p, []).append(i)
        return out


@dataclass
class PairReport:
    """How two shard sets link up; `pairs` is filled only when asked for."""

    pairs: int = 0
    patients_a: int = 0
    patients_b: int = 0
    patients_joined: int = 0
    window_s: float | None = None
    untimed_a: int = 0  # samples left out of a windowed join for lack of a time
    untimed_b: int = 0
    split_mismatches: int = 0  # joined patients whose samples sit in different splits
    by_split: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_rows: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "rows"}
        if with_rows:
            d["rows"] = self.rows
        return d


def find_pairs(
    a: str, b: str, window: float | str | None = None, *, collect: bool = False
) -> PairReport:
    """Join shard sets `a` and `b` on patient; with `window` (seconds or '30d'), keep only
    pairs whose time spans are at most that far apart. `collect` also lists the pairs."""
    if isinstance(window, str):
        window = parse_window(window)
    sa, sb = _Side.load(a), _Side.load(b)
    ga, gb = sa.by_patient(), sb.by_patient()
    joined = sorted(set(ga) & set(gb))
    report = PairReport(patients_a=len(ga), patients_b=len(gb), patients_joined=len(joined),
                        window_s=window)  # fmt: skip
    by_split: Counter = Counter()
    for p in joined:
        ia, ib = ga[p], gb[p]
        splits = {sa.splits[i] for i in ia} | {sb.splits[i] for i in ib}
        if len(splits) > 1:
            report.split_mismatches += 1
        if window is not None:
            ia, ib = _timed(sa, ia, report, "a"), _timed(sb, ib, report, "b")
            ok = _within(sa, ia, sb, ib, window)
        else:
            ok = np.ones((len(ia), len(ib)), bool)
        n = int(ok.sum())
        report.pairs += n
        by_split[sa.splits[ia[0]] if ia else ""] += n
        if collect and n:
            for x, y in zip(*np.nonzero(ok), strict=True):
                ka, kb = ia[x], ib[y]
                report.rows.append(
                    {"a": sa.keys[ka], "b": sb.keys[kb], "patient_id": p,
                     "split_a": sa.splits[ka], "split_b": sb.splits[kb]}
                )  # fmt: skip
    report.by_split = {k: v for k, v in sorted(by_split.items()) if v}
    return report


def _timed(side: _Side, idx: list[int], report: PairReport, which: str) -> list[int]:
    kept = [i for i in idx if side.spans[i] is not None]
    setattr(report, f"untimed_{which}", getattr(report, f"untimed_{which}") + len(idx) - len(kept))
    return kept


def _within(sa: _Side, ia: list[int], sb: _Side, ib: list[int], window: float) -> np.ndarray:
    """Pairwise: the gap between the two spans (0 if they overlap) is at most `window`."""
    if not ia or not ib:
        return np.zeros((len(ia), len(ib)), bool)
    a = np.array([sa.spans[i] for i in ia], float)
    b = np.array([sb.spans[i] for i in ib], float)
    gap = np.maximum(b[None, :, 0] - a[:, None, 1], a[:, None, 0] - b[None, :, 1])
    return np.maximum(gap, 0.0) <= window
