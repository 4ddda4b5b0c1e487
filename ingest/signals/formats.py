"""Registered signal formats: WFDB, EDF/BDF, DICOM waveform and CSV readers for `medfm ingest`.

A WFDB record, EDF file, DICOM waveform or CSV file is one item; it yields one `signal` sample
per window (or a quarantine record per bad window) on the shared ingest machinery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from medfm.shards import Sample

from ..registry import (
    Quarantine,
    ReadContext,
    Reader,
    SourceFile,
    SourceItem,
    register_reader,
)
from ..sources import identity
from ..spec import SpecError, from_dict, register_section
from . import readers
from .channels import channel_group
from .preprocess import SignalConfig, prepare, windows
from .record import SignalRecord

register_section("signal", SignalConfig)
READER_FUNCS = {
    "wfdb": readers.read_wfdb,
    "edf": readers.read_edf,
    "dicom_waveform": readers.read_dicom_waveform,
    "signal_csv": readers.read_csv_signal,
}


def signal_config(ctx: ReadContext) -> SignalConfig:
    return ctx.spec.sections.get("signal") or SignalConfig()


class SignalReader(Reader):
    """One recording -> windowed `signal` samples with their beat/rhythm/event labels."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        try:
            self.reader_options = from_dict(readers.ReaderOptions, options, "options")
        except SpecError as e:
            raise SpecError(f"{self.name} reader {e}") from None

    def load(self, item: SourceItem, ctx: ReadContext) -> SignalRecord:
        with ctx.local_path(item.files[0]) as path:
            return READER_FUNCS[self.name](path, self.reader_options)

    def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        rec = self.load(item, ctx)
        yield from record_samples(rec, item, ctx, signal_config(ctx))


def record_samples(
    rec: SignalRecord, item: SourceItem, ctx: ReadContext, cfg: SignalConfig
) -> Iterator[Sample | Quarantine]:
    """Preprocess a record and yield its windows as samples (bad windows as quarantines)."""
    raw_pid, pid, study, table_labels = identity(ctx, item)
    split = ctx.split(pid)
    p = prepare(rec, cfg)
    groups = {channel_group(c) for c in p.channels}
    modality = ctx.source.modality or ("ECG" if "ecg" in groups else "EEG" if groups == {"eeg"}
                                       else "OT")  # fmt: skip
    start = ctx.keyring.shift_datetime(raw_pid, rec.start) if rec.start else None
    series = ctx.uid(item.rel, "series")[:20]
    settings = {"signal": dataclasses.asdict(cfg)}
    duration = p.signal.shape[1] / p.fs
    for w in windows(rec, p, cfg):
        t0 = w.start / p.fs
        if w.bad and cfg.bad_window == "quarantine":
            why = ", ".join(f"{c} {r}" for c, r in sorted(w.bad.items()))
            yield Quarantine(
                item.rel,
                f"window {w.index} ({t0:.1f}-{t0 + cfg.window_s:.1f} s): {why}",
                ctx.source.name,
                "BadSignalWindow",
            )
            continue
        meta: dict[str, Any] = {
            "window_index": w.index,
            "window_start_s": round(t0, 6),
            "record_duration_s": round(duration, 6),
            "source_rate": rec.fs,
            "source_format": rec.format,
            "segments": rec.segments,
            "units": p.units,
            "normalize": cfg.normalize,
            "dropped_channels": p.dropped,
        }
        if w.bad:
            meta["bad_channels"] = w.bad
        if w.interpolated:
            meta["interpolated"] = w.interpolated
        if start is not None:
            meta["time"] = (start + dt.timedelta(seconds=t0)).isoformat(timespec="milliseconds")
        yield Sample(
            key=ctx.sample_key(item.rel, str(w.index)),
            kind="signal",
            modality=modality,
            dataset=ctx.source.name,
            patient_id=pid,
            split=split,
            data=w.data,
            study_id=study,
            series_id=series,
            labels={**table_labels, **w.labels},
            sampling_rate=p.fs,
            channels=p.channels,
            extras=w.extras,
            licence=ctx.source.licence,
            provenance={"settings": settings},
            meta=meta,
        )


class WfdbReader(SignalReader):
    """A WFDB record through its `.hea`; multi-segment records read as one recording."""

    def scan(self, f: SourceFile, ctx: ReadContext) -> dict[str, Any] | None:
        # Segment headers of a multi-segment record are not records of their own.
        with ctx.fs.open(f.path, "rb") as fh:
            first = fh.read(4096).decode("latin-1").splitlines()
        lines = [x for x in first if x.strip() and not x.startswith("#")]
        if lines and "/" in lines[0].split()[0]:
            n = int(lines[0].split()[0].split("/")[1])
            return {"segments": [x.split()[0] for x in lines[1 : 1 + n]]}
        return None

    def group(self, files: list[SourceFile], scans: dict[str, Any], source: Any):
        segments = set()
        for f in files:
            for seg in (scans.get(f.rel) or {}).get("segments", []):
                segments.add(os.path.join(os.path.dirname(f.rel), seg + ".hea"))
        for f in files:
            if f.rel not in segments:
                yield SourceItem(source.name, self.name, (f,))

    def load(self, item: SourceItem, ctx: ReadContext) -> SignalRecord:
        with local_record(ctx, item.files[0]) as path:
            return readers.read_wfdb(path, self.reader_options)


@contextmanager
def local_record(ctx: ReadContext, header: SourceFile) -> Iterator[str]:
    """The header path of a WFDB record on local disk (remote records: fetch the record's
    files, which share the folder and the record-name prefix, into a temporary folder)."""
    if type(ctx.fs).__name__ == "LocalFileSystem":
        yield header.path
        return
    folder, name = header.path.rsplit("/", 1)
    stem = name[: -len(".hea")]
    with tempfile.TemporaryDirectory(prefix="medfm-wfdb-") as tmp:
        for path in ctx.fs.glob(f"{folder}/{stem}*"):
            ctx.fs.get(path, os.path.join(tmp, path.rsplit("/", 1)[-1]))
        yield os.path.join(tmp, name)


register_reader(
    "wfdb",
    extensions=(".hea",),
    companions=(".dat", ".atr", ".xyz", ".qrs", ".ecg", ".pu", ".pu0", ".pu1", ".hea-"),
)(WfdbReader)
register_reader("edf", extensions=(".edf", ".bdf", ".rec"))(SignalReader)
register_reader("dicom_waveform")(SignalReader)
register_reader("signal_csv")(SignalReader)
