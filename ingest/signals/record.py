"""`SignalRecord`: what every signal reader returns, before any preprocessing."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from ..registry import IngestError


class SignalReadError(IngestError):
    """A signal file is unreadable or inconsistent; the message names the cause (no PHI)."""


@dataclass
class SignalRecord:
    """A recording in physical units as the file describes it (names and units not yet mapped).

    `beats` are annotation sample indices with their symbols, `rhythms` are (start, end, label)
    episodes in samples, `events` are (onset s, duration s, text) annotations (EDF+).
    `phys_range` holds each channel's (min, max) representable value, for saturation checks.
    `rate_dropped` names the channels left out as too slow to share the record's rate.
    Everything that identifies a person or recording stays out of this object: readers copy
    only the fields listed here and never the free-text headers.
    """

    signal: np.ndarray  # (C, T) physical units (float32 from WFDB, float64 elsewhere)
    fs: float
    channels: list[str]
    units: list[str]
    start: dt.datetime | None = None
    phys_range: list[tuple[float, float]] | None = None
    beats: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    beat_symbols: list[str] = field(default_factory=list)
    rhythms: list[tuple[int, int, str]] = field(default_factory=list)
    events: list[tuple[float, float, str]] = field(default_factory=list)
    format: str = ""
    segments: int = 1
    # Channels the reader left out because bringing them to the record's rate would upsample
    # them too far (raw name -> why); recorded in each window's meta.
    rate_dropped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.signal.ndim != 2 or self.signal.shape[0] != len(self.channels):
            raise SignalReadError(
                f"signal shape {self.signal.shape} does not match {len(self.channels)} channels"
            )
        if not (self.fs and self.fs > 0):
            raise SignalReadError(f"sampling rate {self.fs!r} is not positive")
