"""Registered signal formats: WFDB, EDF/BDF, DICOM waveform and CSV readers for `medfm ingest`.

A WFDB record, EDF file, DICOM waveform or CSV file is one item; it yields one `signal` sample
per window (or a quarantine record per bad window) on the shared ingest machinery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import posixpath
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
    is_companion,
    register_reader,
)
from ..sources import identity
from ..spec import SpecError, from_dict, register_section
from . import readers
from .preprocess import SignalConfig, prepare, primary_group, wanted_channels, windows
from .record import SignalReadError, SignalRecord

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
            return self.read_file(path, ctx)

    def read_file(self, path: str, ctx: ReadContext) -> SignalRecord:
        func = READER_FUNCS[self.name]
        if func in (readers.read_wfdb, readers.read_edf):  # the readers that mix rates
            return func(path, self.reader_options, signal_config(ctx).max_resample_ratio)
        return func(path, self.reader_options)

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
    modality = ctx.source.modality or {"ecg": "ECG", "eeg": "EEG"}.get(
        primary_group(p.channels), "OT"
    )
    start = ctx.keyring.shift_datetime(raw_pid, rec.start) if rec.start else None
    series = ctx.uid(item.rel, "series")[:20]
    duration = p.signal.shape[1] / p.fs
    wanted = set(wanted_channels(p.channels, cfg))
    # The settings used, defaults included when the spec has no signal: section.
    # One object for every window: the task encodes a provenance it has seen once.
    provenance = {"settings": {**ctx.spec.settings(), "signal": dataclasses.asdict(cfg)}}
    found = windows(rec, p, cfg)
    if not found:  # nothing to write must still leave a line (one per file): none vanishes
        raise SignalReadError(
            f"record lasts {duration:.1f} s, shorter than one window of {cfg.window_s:g} s"
        )
    for w in found:
        t0 = w.start / p.fs
        if cfg.bad_window == "quarantine" and wanted <= w.bad.keys():
            why = ", ".join(f"{c} {r}" for c, r in sorted(w.bad.items()))
            yield Quarantine(
                item.rel,
                f"window {w.index} ({t0:.1f}-{t0 + cfg.window_s:.1f} s): every wanted "
                f"channel is bad: {why}",
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
            "dropped_channels": p.dropped + list(rec.rate_dropped),
        }
        if rec.rate_dropped:
            meta["dropped_reasons"] = rec.rate_dropped
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
            provenance=provenance,
            meta=meta,
        )


HEADER_BYTES = 1 << 20  # a WFDB header is text; 1 MiB holds thousands of signal lines


def header_lines(text: str) -> list[list[str]]:
    """The non-comment lines of a WFDB header, split into fields."""
    return [x.split() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]


def header_reads(lines: list[list[str]]) -> tuple[list[str], list[str]]:
    """(segment names, signal file names) a record header names: the files it reads."""
    if not lines:
        return [], []
    record = lines[0][0]
    if "/" in record:  # multi-segment: "name/nseg nsig fs", then one "segment length" line each
        n = int(record.split("/")[1]) if record.split("/")[1].isdigit() else 0
        return [x[0] for x in lines[1 : 1 + n] if x[0] != "~"], []
    n_sig = int(lines[0][1]) if len(lines[0]) > 1 and lines[0][1].isdigit() else 0
    return [], list(dict.fromkeys(x[0] for x in lines[1 : 1 + n_sig] if x[0] != "~"))


class WfdbReader(SignalReader):
    """A WFDB record through its `.hea`; multi-segment records read as one recording. An item
    holds the header and every file the record reads (signal files, segment headers and their
    signal files, annotations), so provenance hashes them all and the job counts their bytes."""

    def scan(self, f: SourceFile, ctx: ReadContext) -> dict[str, Any] | None:
        if not f.rel.lower().endswith(".hea"):
            return None
        folder = posixpath.dirname(f.path)
        segments, names = header_reads(header_lines(self._text(ctx, f.path)))
        for seg in segments:
            path = posixpath.join(folder, seg + ".hea")
            if ctx.fs.exists(path):
                names += [seg + ".hea"] + header_reads(header_lines(self._text(ctx, path)))[1]
        stem = posixpath.basename(f.path)[: -len(".hea")]
        names += [f"{stem}.{ext}" for ext in self.reader_options.annotators]
        reads = {}
        for name in dict.fromkeys(names):
            path = posixpath.join(folder, name)
            if ctx.fs.isfile(path):  # a missing one is the reader's error to report
                reads[name] = int(ctx.fs.size(path) or 0)
        return {"segments": segments, "reads": reads}

    @staticmethod
    def _text(ctx: ReadContext, path: str) -> str:
        with ctx.fs.open(path, "rb") as fh:
            return fh.read(HEADER_BYTES).decode("latin-1")

    def group(self, files: list[SourceFile], scans: dict[str, Any], source: Any):
        consumed, records = set(), []
        for f in files:
            if not f.rel.lower().endswith(".hea"):
                continue
            # A header whose scan failed is still a record: reading it reports the cause.
            scan = {"segments": [], "reads": {}, **(scans.get(f.rel) or {})}
            folder, rel_folder = posixpath.dirname(f.path), posixpath.dirname(f.rel)
            consumed |= {posixpath.join(rel_folder, seg + ".hea") for seg in scan["segments"]}
            reads = tuple(
                SourceFile(posixpath.join(folder, n), posixpath.join(rel_folder, n), size)
                for n, size in scan["reads"].items()
            )
            consumed |= {r.rel for r in reads}
            records.append((f, reads))
        for f, reads in records:
            if f.rel not in consumed:  # segment headers are no records of their own
                yield SourceItem(source.name, self.name, (f, *reads))
        for f in files:
            if not f.rel.lower().endswith(".hea") and f.rel not in consumed:
                if not is_companion(f.rel):
                    yield Quarantine(
                        f.rel, "not a WFDB header, and no header reads it", source.name,
                        "UnsupportedInput",
                    )  # fmt: skip

    def load(self, item: SourceItem, ctx: ReadContext) -> SignalRecord:
        with local_record(ctx, item) as path:
            return self.read_file(path, ctx)


@contextmanager
def local_record(ctx: ReadContext, item: SourceItem) -> Iterator[str]:
    """The header path of a WFDB record on local disk (remote records: fetch the files the
    item lists, which all share the header's folder, into a temporary folder)."""
    header = item.files[0]
    if type(ctx.fs).__name__ == "LocalFileSystem":
        yield header.path
        return
    with tempfile.TemporaryDirectory(prefix="medfm-wfdb-") as tmp:
        for f in item.files:
            ctx.fs.get(f.path, os.path.join(tmp, posixpath.basename(f.path)))
        yield os.path.join(tmp, posixpath.basename(header.path))


# Files a WFDB header consumes: signal files (.dat, .mat, the .d0-.d9 of multi-file records,
# PTB's .xyz) and the annotator extensions PhysioNet databases ship (reference beats, QRS
# detector output: gqrs, sqrs, wqrs, wabp; sleep and apnea labels; ST episodes).
WFDB_COMPANIONS = (
    ".dat", ".mat", ".xyz", *(f".d{i}" for i in range(10)), ".hea-",
    ".atr", ".ari", ".qrs", ".ecg", ".pu", ".pu0", ".pu1", ".gqrsh", ".gqrsl", ".sqrs", ".wqrs",
    ".wabp", ".apn", ".st", ".stf", ".16a", ".arousal", ".hypn", ".trigger", ".man",
)  # fmt: skip
register_reader("wfdb", extensions=(".hea",), companions=WFDB_COMPANIONS)(WfdbReader)
register_reader("edf", extensions=(".edf", ".bdf", ".rec"))(SignalReader)
register_reader("dicom_waveform")(SignalReader)
register_reader("signal_csv")(SignalReader)
