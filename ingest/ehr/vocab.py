"""The EHR vocabulary and per-code quantile bins, fitted on train-split patients only.

Token ids: special tokens first, then interval tokens (CEHR-BERT's W0-W3 weeks, M1-M11
months, LT long-term), then value-bin tokens Q0..Q{bins-1}, then codes seen at least
`min_count` times in train, most frequent first. Everything else maps to [UNK].
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPECIAL = ("[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]")
INTERVALS = tuple(f"[W{i}]" for i in range(4)) + tuple(f"[M{i}]" for i in range(1, 12)) + ("[LT]",)
TYPE_SPECIAL, TYPE_CODE, TYPE_VALUE, TYPE_INTERVAL, TYPE_STATIC = 0, 1, 2, 3, 4


def bottom_k(codes: np.ndarray, values: np.ndarray, prio: np.ndarray, k: int):
    """Per code (codes: integers >= 0), the k values of lowest priority, in no particular
    order: a uniform sample that merges exactly (the bottom-k of a union is the bottom-k of
    the parts' bottom-k). Only codes with more than k values are grouped, each then cut with
    a partition, not a sort: the job's final merge (2.1 M values, 601 codes, k 20,000 for
    2,000 MIMIC-IV patients) took 0.11-0.15 s against 0.40-0.50 s with a lexsort."""
    if len(codes) == 0:
        return codes, values, prio
    per_code = np.bincount(codes)
    keep = per_code[codes] <= k
    over = np.flatnonzero(~keep)
    if len(over):
        grouped = over[np.argsort(codes[over], kind="stable")]  # ascending code, as bounds
        bounds = np.r_[0, np.cumsum(per_code[per_code > k])]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            group = grouped[start:end]
            keep[group[np.argpartition(prio[group], k - 1)[:k]]] = True
    return codes[keep], values[keep], prio[keep]


@dataclass
class Vocabulary:
    tokens: list[str]
    edges: dict[str, list[float]] = field(default_factory=dict)
    bins: int = 10
    min_count: int = 5
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.unk = self.index["[UNK]"]
        self.edge_arrays = {c: np.asarray(e, np.float64) for c, e in self.edges.items()}

    def id(self, token: str) -> int:
        return self.index.get(token, self.unk)

    def bin_token(self, k: int) -> int:
        return self.index[f"Q{k}"]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "medfm-ehr-vocab",
                "version": 1,
                "tokens": self.tokens,
                "special": list(SPECIAL),
                "bins": self.bins,
                "min_count": self.min_count,
                "edges": self.edges,
                "fitted_on": self.fitted_on,
            },
            sort_keys=True,
            indent=0,
        )

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        d = json.loads(text)
        if d.get("format") != "medfm-ehr-vocab":
            raise ValueError("not a medfm EHR vocabulary")
        return cls(d["tokens"], d["edges"], d["bins"], d["min_count"], d["fitted_on"])


def fit_vocabulary(
    counts: Counter,
    codes: np.ndarray,
    values: np.ndarray,
    *,
    bins: int,
    min_count: int,
    min_values: int,
    fitted_on: dict[str, Any],
) -> Vocabulary:
    """Vocabulary from train code counts; quantile edges from train value samples (codes and
    their values, in any order; grouped by code, they are not sorted again)."""
    kept = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
    tokens = list(SPECIAL) + list(INTERVALS) + [f"Q{i}" for i in range(bins)] + kept
    edges: dict[str, list[float]] = {}
    if len(codes):
        if (codes[1:] < codes[:-1]).any():
            order = np.argsort(codes, kind="stable")
            codes, values = codes[order], values[order]
        starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1, len(codes)]
        qs = np.linspace(0, 1, bins + 1)[1:-1]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            if b - a >= min_values:
                e = np.unique(np.quantile(values[a:b], qs))
                edges[str(codes[a])] = [float(x) for x in e]
    return Vocabulary(tokens, edges, bins, min_count, fitted_on)


def interval_token(gap_s: np.ndarray) -> np.ndarray:
    """Interval token index into INTERVALS for gaps of a day or more, else -1."""
    days = gap_s / 86400.0
    out = np.full(len(gap_s), -1, np.int64)
    week = (days >= 1) & (days < 28)
    month = (days >= 28) & (days < 365)
    out[week] = (days[week] // 7).astype(np.int64)
    out[month] = 4 + np.clip(days[month] // 30, 1, 11).astype(np.int64) - 1
    out[days >= 365] = len(INTERVALS) - 1
    return out
