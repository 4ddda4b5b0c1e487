"""The work that runs inside Ray tasks: header scans, statistics passes and conversion.

A conversion task owns one `SampleWriter` under a prefix unique to the task. It writes its
part file (bookkeeping.py) only after the writer closed, so a part file implies committed
shards. Warnings are silenced inside tasks: library warnings can quote header values (PHI).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medfm.io import get_fs, sha256_file
from medfm.shards import Sample, SampleWriter
from medfm.shards.manifest import medfm_version
from medfm.shards.schema import JSONText, to_json

from .bookkeeping import Bookkeeper, scrub_reason
from .imaging import HU_MIN, ct_histogram
from .privacy import Keyring
from .registry import IngestError, Quarantine, ReadContext, SourceFile, SourceItem, create_reader
from .spec import IngestSpec

MAX_REASON = 300


@dataclass
class Task:
    task_id: str
    items: list[SourceItem]
    nbytes: int = 0


@dataclass
class PartResult:
    task_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    hist: dict[str, dict[str, int]] = field(default_factory=dict)
    phash: dict[str, str] = field(default_factory=dict)
    items: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def quiet() -> None:
    """No warnings or chatty loggers in workers: their text can quote PHI-bearing values."""
    warnings.simplefilter("ignore")
    for name in ("pydicom", "nibabel", "PIL"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def shown_path(spec: IngestSpec, keyring: Keyring, rel: str) -> str:
    """The relative path as recorded, or its keyed token when `deid.hash_paths` is on."""
    return keyring.token("path", rel)[:24] if spec.deid.hash_paths else rel


def quarantine_record(spec, keyring, item_or_rel, source: str, exc: BaseException) -> dict:
    rel = item_or_rel.rel if isinstance(item_or_rel, SourceItem) else item_or_rel
    if isinstance(exc, IngestError):
        reason, error = str(exc)[:MAX_REASON], type(exc).__name__
    else:
        reason = f"unexpected {type(exc).__name__}: {scrub_reason(str(exc))}"
        error = "UnexpectedError"
    return Quarantine(shown_path(spec, keyring, rel), reason, source, error).to_dict()


def quarantine_item(
    spec, keyring, item: SourceItem, exc: BaseException, listed: frozenset[str] = frozenset()
) -> list[dict]:
    """One record per input file of a rejected item (every slice of a DICOM series), so
    quarantine.jsonl accounts for each file; files the reader already quarantined on their own
    (`listed`) keep that record. Items that share files with other items (EHR patient buckets,
    told apart by `part`) are listed by their first file only."""
    files = item.files[:1] if "part" in item.info else item.files
    first = quarantine_record(spec, keyring, item, item.source, exc)
    rels = [f.rel for f in files if f.rel not in listed] or [item.rel]
    return [{**first, "path": shown_path(spec, keyring, rel)} for rel in rels]


def scan_files(
    spec: IngestSpec, keyring: Keyring, source: str, fmt: str, files: list[SourceFile]
) -> dict[str, Any]:
    """Per-file header scans for readers that group files (DICOM series)."""
    quiet()
    src = spec.source(source)
    fs, _ = get_fs(src.root, **src.storage_options)
    reader = create_reader(fmt, **src.options)
    ctx = ReadContext(fs, src, spec, keyring)
    out = {}
    for f in files:
        try:
            out[f.rel] = reader.scan(f, ctx)
        except Exception as e:  # noqa: BLE001 - a bad file is a finding, never a crash
            out[f.rel] = {"error": quarantine_record(spec, keyring, f.rel, source, e)["reason"]}
    return out


def iter_samples(
    task: Task,
    spec: IngestSpec,
    keyring: Keyring,
    stats: dict,
    part: PartResult,
    digests: dict[str, str] | None = None,
) -> Iterator[tuple[SourceItem, Sample]]:
    """Read every item of a task; quarantine failures into `part`, yield finished samples.
    Readers put the sha256 of input files they read whole into `digests`."""
    for item in task.items:
        src = spec.source(item.source)
        fs, _ = get_fs(src.root, **src.storage_options)
        ctx = ReadContext(fs, src, spec, keyring, stats, item, digests)
        part.items += 1
        part.bytes_in += item.nbytes
        listed: set[str] = set()  # files the reader quarantined on their own
        try:
            reader = create_reader(item.format, **src.options)
            for out in reader.read(item, ctx):
                if isinstance(out, Quarantine):
                    listed.add(out.rel or item.rel)
                    out.rel = shown_path(spec, keyring, out.rel or item.rel)
                    out.source = out.source or item.source
                    part.quarantine.append(out.to_dict())
                else:
                    yield item, out
        except Exception as e:  # noqa: BLE001 - quarantine and carry on with the next item
            part.quarantine.extend(quarantine_item(spec, keyring, item, e, frozenset(listed)))


def provenance(
    item: SourceItem, spec: IngestSpec, keyring: Keyring, fs, digests: dict[str, str] | None = None
) -> dict[str, Any]:
    files = list(item.files) + ([item.label] if item.label else [])
    digests = digests or {}
    return {
        "source": item.source,
        "path": shown_path(spec, keyring, item.rel),
        "reader": item.format,
        "inputs": {
            shown_path(spec, keyring, f.rel): digests.get(f.path) or sha256_file(fs, f.path)[0]
            for f in files
        },
        "label_path": shown_path(spec, keyring, item.label.rel) if item.label else "",
        "settings": spec.settings(),
        "medfm_version": medfm_version(),
    }


def thumbnail_hash(sample: Sample) -> str:
    """Perceptual hash of a 2D thumbnail (middle axial slice for volumes), for near-duplicates."""
    import imagehash
    from PIL import Image

    a = sample.data
    if sample.kind == "volume3d":
        a = a[:, :, a.shape[2] // 2].T
    elif sample.kind != "image2d":
        return ""
    if a.ndim == 3:
        a = a.mean(axis=2)
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0, 1)
    a = np.clip((a - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return str(imagehash.phash(Image.fromarray(a)))


def _add_hist(part: PartResult, dataset: str, hist: np.ndarray) -> None:
    acc = part.hist.setdefault(dataset, {})
    for i in np.flatnonzero(hist):
        acc[str(int(i) + HU_MIN)] = acc.get(str(int(i) + HU_MIN), 0) + int(hist[i])


def _ct_hist(sample: Sample, spec: IngestSpec) -> np.ndarray | None:
    if sample.modality != "CT" or sample.kind != "volume3d":
        return None
    if sample.meta.get("intensity", {}).get("mode") != "raw":
        return None
    return ct_histogram(sample.data, sample.label_map, spec.intensity.ct_foreground_hu)


def stats_task(task: Task, spec: IngestSpec, keyring: Keyring) -> dict[str, dict[str, int]]:
    """First pass (only when CT is normalized at write time): foreground HU histograms."""
    quiet()
    part = PartResult(task.task_id)
    for _, sample in iter_samples(task, spec, keyring, {}, part):
        hist = _ct_hist(sample, spec)
        if hist is not None:
            _add_hist(part, sample.dataset, hist)
    return part.hist


def convert_task(
    task: Task, spec: IngestSpec, keyring: Keyring, stats: dict, dest: str
) -> dict[str, Any]:
    """Convert one task's items into shards, then commit its part file; returns the part."""
    quiet()
    part = PartResult(task.task_id)
    writer = SampleWriter(
        dest,
        prefix=task.task_id,
        shard_max_bytes=spec.shards.shard_bytes,
        chunks=tuple(spec.shards.chunks),
        image_encoding=spec.shards.image_encoding,
        pyramid_levels=spec.shards.pyramid_levels,
    )
    try:
        prov: dict[str, dict[str, Any]] = {}  # per item: a record yields many windows
        encoded: dict[str, tuple[dict[str, Any], JSONText]] = {}  # ... sharing one provenance
        digests: dict[str, str] = {}
        for item, sample in iter_samples(task, spec, keyring, stats, part, digests):
            iid = item.item_id  # a hash of the item's paths: computed once per sample
            if iid not in prov:
                src = spec.source(item.source)
                fs, _ = get_fs(src.root, **src.storage_options)
                prov[iid] = provenance(item, spec, keyring, fs, digests)
            own = sample.provenance  # the reader's part: one object for all of a record's windows
            if iid not in encoded or encoded[iid][0] is not own:
                encoded[iid] = (own, JSONText(to_json({**prov[iid], **own})))
            sample.provenance = encoded[iid][1]
            hist = _ct_hist(sample, spec)
            if hist is not None:
                _add_hist(part, sample.dataset, hist)
            part.phash[sample.key] = thumbnail_hash(sample)
            try:
                part.rows.append(writer.write(sample))
            except ValueError as e:  # the shard contract refused the sample
                part.quarantine.append(quarantine_record(spec, keyring, item, item.source, e))
        _, files = writer.close()
    except BaseException:
        writer.abort()
        raise
    part.files = [asdict(f) for f in files]
    part.bytes_out = sum(f.bytes for f in files)
    out = dict(vars(part))  # shallow: asdict deep-copies every row and histogram bin (~12 ms)
    Bookkeeper(dest).write_part(task.task_id, out)
    return out
