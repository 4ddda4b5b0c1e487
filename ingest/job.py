"""The ingest driver: discover, scan, (stats pass), convert on Ray, dedupe, write the manifest.

    run_ingest(load_spec("spec.yaml"), "out/", address=None, workers=None, resume=False)

Without `address` a local Ray runtime starts with the machine's cores (or `workers`); with it
the same tasks run on an existing cluster (workers need medfm installed and read access to the
sources). An already-initialised Ray (tests, notebooks) is used as it is.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from medfm.compat import ray_jobs_dead
from medfm.io import as_url, get_fs, is_local, remove_temporaries, sha256_bytes, sha256_file
from medfm.shards import SPLITS, write_manifest
from medfm.shards.tarshard import ShardFile

from .append import Base, check_compatible, open_base, prepared_sources, version_items
from .bookkeeping import (
    DRIVER_FILE,
    PARTS_DIR,
    REPORT_FILE,
    STATS_FILE,
    Bookkeeper,
    DiskFullError,
    Lease,
    scrub_records,
)
from .dicom_deid import METHOD, METHOD_CODES
from .dicomweb import fetch_sources
from .imaging import HU_MAX, HU_MIN, hist_stats
from .privacy import Keyring
from .progress import Progress, emit, gather
from .registry import (
    PrepareContext,
    Quarantine,
    Reader,
    SourceFile,
    SourceItem,
    create_reader,
    is_companion,
    reader_for,
)
from .sources import attach_labels, list_files, pair_labels
from .spec import IngestSpec
from .tasks import Task, convert_task, scan_files, shown_path, stats_task

SCAN_BATCH = 256
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DRIVER_GRACE_S = 2.0
HEAD_BYTES = 132


@dataclass
class Summary:
    """What the job did; printed at the end and saved in ingest_report.json."""

    files_in: int = 0
    items: int = 0
    written: int = 0
    quarantined: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tasks_run: int = 0
    tasks_reused: int = 0
    wall_s: float = 0.0
    by_split: dict[str, int] = field(default_factory=dict)
    version: int = 1  # the manifest version the job wrote (an append: the one it added)
    skipped: int = 0  # an append's items that the set already holds

    def line(self) -> str:
        appended = (
            f"; version {self.version}, {self.skipped} items already in the set skipped"
            if self.version > 1 or self.skipped
            else ""
        )
        return (
            f"[ingest] done: {self.files_in} files in, {self.written} samples written, "
            f"{self.quarantined} quarantined, {self.duplicates} duplicates dropped, "
            f"{self.near_duplicates} near-duplicate pairs across splits, "
            f"{self.bytes_in / 1e6:.1f} MB read, {self.bytes_out / 1e6:.1f} MB written, "
            f"{self.wall_s:.1f} s ({self.tasks_run} tasks run, {self.tasks_reused} reused)"
            f"{appended}"
        )


@contextmanager
def ray_runtime(address: str | None, workers: int | None, progress: bool = False):
    """Ray for the job (`progress`: a line when it starts and when it is up, with the time)."""
    import ray

    if ray.is_initialized():
        _ray_line(ray, "using the running Ray runtime", progress)
        yield ray
        return
    t0 = time.monotonic()
    if address:
        emit(f"[ingest] ray: connecting to {address}", console=progress)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = workers or os.cpu_count()
        emit(f"[ingest] ray: starting a local runtime ({cpus} CPUs)", console=progress)
        ray.init(num_cpus=cpus, include_dashboard=False)
    _ray_line(ray, f"{'connected' if address else 'started'} in {time.monotonic() - t0:.1f} s",
              progress)  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_line(ray, what: str, progress: bool) -> None:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    emit(f"[ingest] ray: {what} ({cpus} CPUs)", console=progress)


def _head(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def discover(spec: IngestSpec, keyring: Keyring, ray,
             progress: bool = False) -> tuple[list[SourceItem], list, int]:  # fmt: skip
    """(items, quarantine records, files seen) over every source; `progress` shows a line
    per source as its files are sorted into formats, and one per header scan."""
    items: list[SourceItem] = []
    bad: list[dict[str, str]] = []
    n_files = 0
    for src in spec.sources:
        fs, files, skipped = list_files(src)
        images, labels = pair_labels(src, files, fs)
        bad += [_record(spec, keyring, q) for q in skipped + labels.quarantine]
        n_files += len(files)
        found: list[SourceItem] = []
        by_format: dict[str, list[SourceFile]] = defaultdict(list)
        prog = Progress(0, len(images), phase=f"{src.name} discovery", unit="files",
                        enabled=progress)  # fmt: skip
        prog.quarantined = len(skipped) + len(labels.quarantine)
        for f in images:
            fmt = src.format if src.format != "auto" else reader_for(f.rel)
            if fmt is None and not is_companion(f.rel):
                fmt = reader_for(f.rel, _head(fs, f.path))
            unknown = fmt is None and not is_companion(f.rel)
            prog.update(1, 0, 0, 0, quarantined=int(unknown))
            if unknown:
                q = Quarantine(f.rel, "unrecognised file format", src.name, "UnsupportedInput")
                bad.append(_record(spec, keyring, q))
            if fmt is not None:
                by_format[fmt].append(f)
        if not images:
            prog.show()
        for fmt, group in sorted(by_format.items()):
            reader = create_reader(fmt, **src.options)
            scans = _scan(spec, keyring, src.name, fmt, group, reader, ray, progress)
            for out in reader.group(group, scans, src):
                if isinstance(out, Quarantine):
                    out.source = src.name
                    bad.append(_record(spec, keyring, out))
                else:
                    found.append(out)
        bad += [_record(spec, keyring, q) for q in attach_labels(labels, found, src.name)]
        found.sort(key=lambda it: (it.rel, it.item_id))
        items += found[: src.limit]  # limit None: every item
    items.sort(key=lambda it: (it.source, it.rel, it.item_id))
    return items, bad, n_files


def _record(spec: IngestSpec, keyring: Keyring, q: Quarantine) -> dict[str, str]:
    q.rel = shown_path(spec, keyring, q.rel)
    return q.to_dict()


def _scan(spec, keyring, source, fmt, files, reader, ray, progress=False) -> dict[str, Any]:
    """Run the reader's header scan as Ray tasks (here, in this process, when ray is None),
    if it has one; its line counts files, its ETA goes by their sizes."""
    if type(reader).scan is Reader.scan:
        return {}
    if ray is None:  # benchmarks time a worker's steady state: discovery and tasks, no Ray
        return scan_files(spec, keyring, source, fmt, files)
    remote = ray.remote(num_cpus=1)(scan_files)
    batches = [files[i : i + SCAN_BATCH] for i in range(0, len(files), SCAN_BATCH)]
    sizes = [sum(f.size for f in b) for b in batches]
    prog = Progress(sum(sizes), len(files), phase=f"{source} header scan", unit="files",
                    enabled=progress)  # fmt: skip
    tasks = [partial(remote.remote, spec, keyring, source, fmt, b) for b in batches]
    out: dict[str, Any] = {}
    for part in gather(ray, tasks, prog, sizes, units=[len(b) for b in batches]):
        out.update(part)
    return out


AUTO_TASKS = 32  # an unset shards.task_items cuts a job into this many tasks...
AUTO_TASK_ITEMS = 64  # ...or more, where they would hold more than this many items


def task_sizes(spec: IngestSpec, n_items: int) -> list[int]:
    """Items per task, in order: `shards.task_items` each (the last one the rest), or when it
    is unset, AUTO_TASKS tasks (one per item below that; more above AUTO_TASK_ITEMS each) whose
    sizes differ by one at most. That many keep a few dozen workers busy to the end, and a
    task of several items shares its fixed costs (a tar and a part file, each written, fsynced
    and renamed) between them: with one 30-min ECG record per task those cost 12% of the work.
    Equal sizes let every worker finish at about the same time (200 records: 8 x 7 + 24 x 6,
    16 each for 2 workers, not 28 x 7 + 4). It depends on the item count only, so the same
    inputs give the same tasks, and a resume finds them."""
    if spec.shards.task_items is not None:
        full, rest = divmod(n_items, spec.shards.task_items)
        return [spec.shards.task_items] * full + [rest] * (rest > 0)
    n_tasks = max(min(n_items, AUTO_TASKS), -(-n_items // AUTO_TASK_ITEMS))
    if n_tasks == 0:
        return []
    size, larger = divmod(n_items, n_tasks)
    return [size + 1] * larger + [size] * (n_tasks - larger)


def plan_tasks(items: list[SourceItem], spec: IngestSpec) -> list[Task]:
    """Deterministic batches (same inputs -> same tasks -> same shard prefixes on resume): the
    sizes of `task_sizes`, a task cut short where its input would pass `shards.task_bytes`."""
    tasks, cur, cur_bytes = [], [], 0
    sizes = iter(task_sizes(spec, len(items)))
    want = next(sizes, 1)
    for it in items:
        if cur and (len(cur) >= want or cur_bytes + it.nbytes > spec.shards.task_bytes):
            tasks.append(cur)
            cur, cur_bytes, want = [], 0, next(sizes, want)
        cur.append(it)
        cur_bytes += it.nbytes
    if cur:
        tasks.append(cur)
    out = []
    for batch in tasks:
        digest = sha256_bytes("\0".join(i.item_id for i in batch).encode())
        out.append(Task(f"t{digest[:20]}", batch, sum(i.nbytes for i in batch)))
    return out


def needs_stats_pass(spec: IngestSpec) -> bool:
    return spec.intensity.ct == "zscore"


def merge_hists(hists: list[dict[str, dict[str, int]]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for h in hists:
        for ds, bins in h.items():
            acc = out.setdefault(ds, np.zeros(HU_MAX - HU_MIN, np.int64))
            for hu, n in bins.items():
                acc[int(hu) - HU_MIN] += n
    return out


def ct_stats(spec: IngestSpec, hists: list[dict]) -> dict[str, dict[str, Any]]:
    merged = merge_hists(hists)
    return {ds: {"ct": hist_stats(h, spec.intensity.percentiles)} for ds, h in merged.items()}


def run_stats_pass(spec, keyring, tasks, book: Bookkeeper, ray, progress: bool = False,
                   workers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """CT foreground histograms of every task (at most `workers` at once), merged; cached."""
    cached = book.read_json(book.job_file(STATS_FILE))
    if cached is not None:
        emit("[ingest] CT statistics: kept from the earlier run", console=progress)
        return cached
    remote = ray.remote(num_cpus=1, max_retries=3)(stats_task)
    nbytes = [t.nbytes for t in tasks]
    prog = Progress(sum(nbytes), len(tasks), phase="CT statistics", unit="tasks",
                    enabled=progress)  # fmt: skip
    submit = [partial(remote.remote, t, spec, keyring) for t in tasks]
    hists = gather(ray, submit, prog, nbytes, workers)
    stats = ct_stats(spec, hists)
    book.write_json(book.job_file(STATS_FILE), stats)
    return stats


def ct_statistics(spec, keyring, tasks, book, ray, progress, workers, base: Base | None = None,
                  refit: bool = False, every: list[SourceItem] = ()) -> dict[str, Any]:  # fmt: skip
    """The CT statistics the conversion applies and the manifest records: a first pass when CT
    is z-scored. An append keeps the set's (a pass only for its new datasets); `refit` passes
    over every input this job found, those already in the set included."""
    if base is None:
        return (
            run_stats_pass(spec, keyring, tasks, book, ray, progress, workers)
            if needs_stats_pass(spec)
            else {}
        )
    if refit:
        every_task = plan_tasks(list(every), spec)
        return run_stats_pass(spec, keyring, every_task, book, ray, progress, workers)
    kept = base.ct_stats()
    new = [i for t in tasks for i in t.items if i.source not in kept]
    fresh = (
        run_stats_pass(spec, keyring, plan_tasks(new, spec), book, ray, progress, workers)
        if new and needs_stats_pass(spec)
        else {}
    )
    return {**fresh, **kept}


PREPARE_FILE = "_ingest/prepare.json"
OUTPUT_FOLDERS = ("tars", "volumes.zarr", "ehr")  # where conversion tasks write samples


def run_prepare(spec, keyring, items, dest, book: Bookkeeper, ray, progress: bool = True,
                workers: int | None = None, base: Base | None = None) -> dict:  # fmt: skip
    """Readers' driver-side passes (EHR vocabulary), their Ray tasks capped at `workers` as
    the conversion's are; cached so that a resume reuses them. In an append (`base`) a source
    keeps what the set's earlier version fitted (its vocabulary)."""
    cached = book.read_json(book.job_file(PREPARE_FILE))
    if cached is not None:
        return cached
    out: dict[str, Any] = {}
    for source, fmt in sorted({(i.source, i.format) for i in items}):
        src = spec.source(source)
        reader = create_reader(fmt, **src.options)
        if type(reader).prepare is Reader.prepare:
            continue
        fs, _ = get_fs(src.root, **src.storage_options)
        work = as_url(book.fs, book.path(f"_ingest/prepare/{source}"))
        kept = base.prepared(source) if base is not None else None
        ctx = PrepareContext(spec, src, keyring, fs, dest, work, ray, progress, workers, kept)
        mine = [i for i in items if i.source == source and i.format == fmt]
        out[source] = reader.prepare(mine, ctx)
        if "quarantine" in out[source]:
            out[source]["quarantine"] = scrub_records(out[source]["quarantine"])
    book.write_json(book.job_file(PREPARE_FILE), out)
    return out


def run_conversion(spec, keyring, tasks, stats, dest, book, ray, workers, progress) -> tuple:
    """Submit unfinished tasks (two per CPU in flight, or `workers`): (parts, run, reused)."""
    parts = book.finished_parts()
    todo = [t for t in tasks if t.task_id not in parts]
    reused = len(tasks) - len(todo)
    done_bytes = sum(t.nbytes for t in tasks if t.task_id in parts)
    seen: set[str] | None = set() if spec.dedup.exact else None  # pixel hashes written so far
    kept, dups = _count_rows([r for p in parts.values() for r in p["rows"]], seen)
    bad = sum(len(p["quarantine"]) for p in parts.values())
    progress.update(reused, kept, done_bytes, 0, quarantined=bad, duplicates=dups)
    remote = ray.remote(num_cpus=1, max_retries=3)(convert_task)
    # Ray runs one task per CPU; one more queued behind each hides the round trip from a task's
    # end to the next one's start. An explicit `workers` below the cluster's CPUs caps the tasks
    # submitted, queued ones included, as nothing else would stop Ray running them at once.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = workers if workers and workers < cpus else cpus * 2
    stats_ref = ray.put(stats)
    pending: dict[Any, Task] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < limit:
            t = queue.pop(0)
            pending[remote.remote(t, spec, keyring, stats_ref, dest)] = t
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress.every)
        for ref in ready:
            t = pending.pop(ref)
            try:
                part = ray.get(ref)
            except BaseException:
                _stop_tasks(ray, pending)
                raise
            parts[t.task_id] = part
            kept, dups = _count_rows(part["rows"], seen)
            progress.update(1, kept, t.nbytes, part["bytes_out"],
                            quarantined=len(part["quarantine"]), duplicates=dups)  # fmt: skip
        if not ready:
            progress.show()
    return parts, len(todo), reused


def _count_rows(rows: list[dict[str, Any]], seen: set[str] | None) -> tuple[int, int]:
    """(rows kept, duplicates) as `dedupe` will count them, given the pixel hashes `seen` in
    earlier tasks (None: no exact dedupe); the progress line does not count a duplicate as
    written."""
    if seen is None:
        return len(rows), 0
    dups = 0
    for row in rows:
        if row["kind"] == "ehr":
            continue
        dups += row["sha256"] in seen
        seen.add(row["sha256"])
    return len(rows) - dups, dups


def _stop_tasks(ray, pending: dict) -> None:
    """Cancel the tasks still in flight and wait until they ended (a writer aborting on a full
    disk must be done before its temporaries are removed); their errors are expected."""
    for ref in pending:
        ray.cancel(ref)
    for ref in pending:
        try:
            ray.get(ref, timeout=60)
        except Exception:  # noqa: BLE001, S110 - cancelled, or failed the same way
            pass


def dedupe(rows: list[dict[str, Any]]) -> tuple[list, list]:
    """Keep the first row (by key) of each decoded-pixel hash; returns (kept, dropped pairs)."""
    seen: dict[str, str] = {}
    kept, dropped = [], []
    for row in sorted(rows, key=lambda r: r["key"]):
        if row["kind"] == "ehr":  # equal token sequences of two patients are not duplicates
            kept.append(row)
            continue
        h = row["sha256"]
        if h in seen:
            dropped.append({"kept": seen[h], "dropped": row["key"], "sha256": h})
        else:
            seen[h] = row["key"]
            kept.append(row)
    return kept, dropped


def near_duplicates(rows: list[dict], phash: dict[str, str], max_dist: int) -> list[dict]:
    """Pairs in different splits whose thumbnails' 64-bit pHashes differ in <= max_dist bits.

    Pigeonhole: two hashes within d bits agree exactly on at least one of d+1 blocks, so only
    pairs sharing a block are compared (no all-pairs scan).
    """
    split = {r["key"]: r["split"] for r in rows}
    hashes = {k: int(h, 16) for k, h in phash.items() if h and k in split}
    nblocks = max_dist + 1
    width = 64 // nblocks
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    for k, h in sorted(hashes.items()):
        for b in range(nblocks):
            buckets[(b, (h >> (b * width)) & ((1 << width) - 1))].append(k)
    found: dict[tuple[str, str], int] = {}
    for keys in buckets.values():
        for i, a in enumerate(keys):
            for bkey in keys[i + 1 :]:
                if split[a] == split[bkey] or (a, bkey) in found:
                    continue
                d = bin(hashes[a] ^ hashes[bkey]).count("1")
                if d <= max_dist:
                    found[(a, bkey)] = d
    return [
        {"a": a, "b": b, "splits": [split[a], split[b]], "hamming": d}
        for (a, b), d in sorted(found.items())
    ]


def _dataset_records(spec, rows, stats, hists) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw_stats = ct_stats(spec, hists)
    splits = Counter((r["dataset"], r["split"]) for r in rows)  # one pass: 36,000 ECG rows
    modalities = defaultdict(set)
    for r in rows:
        modalities[r["dataset"]].add(r["modality"])
    for src in spec.sources:
        by_split = {s: splits[src.name, s] for s in SPLITS}
        rec: dict[str, Any] = {
            "samples": sum(by_split.values()),
            "splits": by_split,
            "modalities": sorted(modalities[src.name]),
            "licence": src.licence,
        }
        rec.update((stats.get(src.name) or {}).get("dataset", {}))
        ct = (stats.get(src.name) or raw_stats.get(src.name) or {}).get("ct")
        if ct:
            rec["intensity"] = {
                "CT": {
                    "method": "nnU-Net CT: clip to foreground percentiles, z-score",
                    "applied": spec.intensity.ct == "zscore",
                    "percentiles": spec.intensity.percentiles,
                    "foreground": f"HU > {spec.intensity.ct_foreground_hu} (label > 0 if given)",
                    **ct,
                }
            }
        out[src.name] = rec
    return out


def _attributes(spec: IngestSpec) -> dict[str, Any]:
    return {
        "deidentification": {
            "PatientIdentityRemoved": "YES",
            "DeidentificationMethod": METHOD,
            "DeidentificationMethodCodeSequence": [
                {"CodeValue": v, "CodingSchemeDesignator": "DCM", "CodeMeaning": m}
                for v, m in METHOD_CODES
            ],
            "private_tags": "kept" if spec.deid.keep_private_tags else "removed",
            "burned_in_annotation": "accepted" if spec.deid.allow_burned_in else "quarantined",
            # "relative" only by the spec's explicit opt-in, deid.hash_paths: false
            "paths": "keyed-hash" if spec.deid.hash_paths else "relative",
            # RTSTRUCT segments: coded values, or the free-text ROIName by deid.keep_roi_names
            "roi_names": "kept" if spec.deid.keep_roi_names else "coded-only",
        },
        "ingest": {
            "spec_sha256": spec.fingerprint(),
            "split": dataclasses.asdict(spec.split),
            "settings": spec.settings(),
            # A trial run of a spec: the set holds only the first N items of these sources.
            "limits": {s.name: s.limit for s in spec.sources if s.limit is not None},
        },
    }


def finish(spec, keyring, dest, book, parts, bad, stats, summary, base: Base | None = None,
           refit: bool = False) -> None:  # fmt: skip
    """Dedupe, write quarantine/report, then the manifest (the commit point) last. An append
    (`base`: the version it builds on) adds a version holding the old rows and the new ones;
    with no new sample it adds none."""
    rows = [r for p in parts.values() for r in p["rows"]]
    files = {f["path"]: f for p in parts.values() for f in p["files"]}
    rows, dropped = dedupe(rows) if spec.dedup.exact else (rows, [])
    if base is not None:  # content the set already holds is a duplicate too
        rows, present = base.drop_present(rows)
        dropped += present
    for d in dropped:  # a dropped volume's Zarr group goes; tar members stay, unlisted
        prefix = f"volumes.zarr/{d['dropped']}/"
        for path in [p for p in files if p.startswith(prefix)]:
            del files[path]
        if book.fs.exists(book.path(prefix)):
            book.fs.rm(book.path(prefix), recursive=True)
    phash = {k: v for p in parts.values() for k, v in p["phash"].items()}
    near = near_duplicates(rows, phash, spec.dedup.near_hamming)
    for prep in stats.values():  # files written by Reader.prepare (EHR vocabularies)
        for rel in prep.get("artifacts", []):
            digest, size = sha256_file(book.fs, book.path(rel))
            files[rel] = {"path": rel, "sha256": digest, "bytes": size}
    quarantine = bad + [q for p in parts.values() for q in p["quarantine"]]
    quarantine += [q for prep in stats.values() for q in prep.get("quarantine", [])]
    book.write_quarantine(quarantine)
    summary.written, summary.quarantined = len(rows), len(quarantine)
    summary.duplicates, summary.near_duplicates = len(dropped), len(near)
    summary.bytes_out = sum(f["bytes"] for f in files.values())
    splits = Counter(r["split"] for r in rows)
    summary.by_split = {s: splits[s] for s in SPLITS}
    hists = [p["hist"] for p in parts.values()]
    report = {"duplicates": dropped, "near_duplicates_across_splits": near}
    datasets, attributes = _dataset_records(spec, rows, stats, hists), _attributes(spec)
    if base is not None:
        if not rows:
            summary.version = base.version
            book.write_json(REPORT_FILE, {**report, "summary": dataclasses.asdict(summary)})
            return
        summary.version = base.version + 1
        added = {"added": len(rows), "skipped": summary.skipped, "refit": refit}
        gone = {d["dropped"] for d in dropped}
        dups = [r for p in parts.values() for r in p["rows"] if r["key"] in gone]
        rows, files, datasets, attributes = base.merge(rows, files, datasets, attributes, added,
                                                       dups)  # fmt: skip
        datasets.update(_dataset_records(spec, rows, stats, hists))  # counts over all rows
    book.write_json(REPORT_FILE, {**report, "summary": dataclasses.asdict(summary)})
    write_manifest(
        dest,
        rows,
        [
            ShardFile(f["path"], f["sha256"], f["bytes"], f.get("samples", 0))
            for f in files.values()
        ],
        datasets=datasets,
        attributes=attributes,
        version=summary.version,
    )


def register_driver(book: Bookkeeper, ray, wait_for_previous: bool, timeout: float = 120.0):
    """Record this driver's Ray job. On resume, tasks of a SIGKILLed driver on the same cluster
    can outlive it for a moment and race the re-run tasks writing the same shards: wait until
    Ray has declared that job dead."""
    ctx = ray.get_runtime_context()
    me = {"job_id": ctx.get_job_id(), "gcs": ctx.gcs_address}
    prev = book.read_json(DRIVER_FILE)
    book.write_json(DRIVER_FILE, me)
    if (
        not wait_for_previous
        or not prev
        or prev.get("gcs") != me["gcs"]
        or prev.get("job_id") == me["job_id"]
    ):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = ray_jobs_dead()
        if jobs is None:  # job states unknown: fall back to a grace period
            time.sleep(DRIVER_GRACE_S)
            return
        if jobs.get(prev["job_id"], True):
            break
        time.sleep(0.5)
    if prev["job_id"] in jobs:
        time.sleep(DRIVER_GRACE_S)  # its workers are killed right after the job is marked dead


def run_ingest(
    spec: IngestSpec,
    dest: str,
    *,
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    keyring: Keyring | None = None,
    append: bool = False,
    refit: bool = False,
) -> Summary:
    """Run (or resume) an ingest job; returns its summary. `append`: add the inputs the
    finished set at `dest` does not hold as a new manifest version (ingest/append.py), keeping
    its CT statistics unless `refit`; re-running an interrupted append resumes it.

    The destination's lease is taken first, so nothing (not even temporaries) is touched while
    another job runs there. A new job that fails before its conversion starts leaves no
    bookkeeping behind. A full disk ends the job with a DiskFullError once its tasks stopped
    and its temporaries are gone; `--resume` carries on when there is space.
    """
    t0 = time.monotonic()
    keyring = keyring or Keyring.load(spec.deid.key_file or None)
    book = Bookkeeper(dest)
    lease, new_root = book.lease(), not book.fs.exists(book.root)
    summary = Summary()
    try:
        lease.acquire()
        _run(spec, dest, book, lease, keyring, summary, address, workers, resume, progress, t0,
             append=append, refit=refit)  # fmt: skip
    except BaseException as e:
        if _disk_full(e) is None:
            raise
        raise _disk_full_error(book, dest, summary) from None
    finally:
        lease.release()
        book.tidy(created_root=new_root)
    return summary


def _run(spec, dest, book: Bookkeeper, lease: Lease, keyring, summary: Summary, address,
         workers, resume, progress, t0: float, *, append: bool = False,
         refit: bool = False) -> None:  # fmt: skip
    base = None
    if append:
        base = open_base(dest, book)
        check_compatible(base, _attributes(spec))
        created = book.start_append(spec.fingerprint(), keyring, base.version + 1, refit)
    else:
        created = book.start(spec.fingerprint(), keyring, resume)
    remove_temporaries(book.fs, book.root)
    with ExitStack() as stack:
        try:
            ray = stack.enter_context(ray_runtime(address, workers, progress))
            register_driver(book, ray, wait_for_previous=not created)
            spec = fetch_sources(spec, book, keyring, progress)  # PACS sources: local copies
            items, bad, summary.files_in = discover(spec, keyring, ray, progress)
            every = items
            if base is not None:
                ehr = prepared_sources(spec, items, refit)
                items = base.new_items(spec, keyring, items, ehr)
                version_items(items, ehr, base.version + 1)
                summary.skipped = len(every) - len(items)
            tasks = plan_tasks(items, spec)
        except BaseException:
            if created:  # a failed start leaves nothing behind: a plain rerun works
                book.abandon_append() if base is not None else book.abandon()
            raise
        summary.items = len(items)
        summary.bytes_in = sum(t.nbytes for t in tasks)
        stats = ct_statistics(spec, keyring, tasks, book, ray, progress, workers,
                              base, refit, every)  # fmt: skip
        for source, prep in run_prepare(
            spec, keyring, items, dest, book, ray, progress, workers, base
        ).items():
            stats[source] = {**stats.get(source, {}), **prep}
        prog = Progress(summary.bytes_in, len(tasks), enabled=progress)
        # counted live from here on: discovery's and the prepare passes' records first
        prog.quarantined = len(bad) + sum(len(p.get("quarantine", [])) for p in stats.values())
        parts, summary.tasks_run, summary.tasks_reused = run_conversion(
            spec, keyring, tasks, stats, dest, book, ray, workers, prog
        )
    lease.check()
    # Every task is done: a temporary among the outputs now is a dead attempt's (a worker killed
    # mid-write, whose task Ray retried under a new temporary name), a sample's or a part
    # record's. Not elsewhere under _ingest/, where the lease's heartbeat thread still writes
    # through temporaries.
    for folder in (*OUTPUT_FOLDERS, PARTS_DIR):
        remove_temporaries(book.fs, f"{book.root}/{folder}")
    parts = {t.task_id: parts[t.task_id] for t in tasks}  # only this job's tasks, in order
    summary.wall_s = round(time.monotonic() - t0, 3)
    finish(spec, keyring, dest, book, parts, bad, stats, summary, base, refit)
    if base is not None:
        book.finish_append()
    for prep in stats.values():  # Reader.prepare's work files (EHR: every raw code), once done
        if prep.get("scratch") and book.fs.exists(prep["scratch"]):
            book.fs.rm(prep["scratch"], recursive=True)


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `e`: raised here, or inside a Ray task (its `cause`)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
        seen += 1
    return None


def _disk_full_error(book: Bookkeeper, dest: str, summary: Summary) -> DiskFullError:
    """Remove the temporaries a full disk left (the tasks have stopped), and say how much room
    the rest needs: the input still to convert times the output/input ratio so far."""
    remove_temporaries(book.fs, book.root)
    parts = book.finished_parts()
    done_in = sum(p.get("bytes_in", 0) for p in parts.values())
    done_out = sum(p.get("bytes_out", 0) for p in parts.values())
    ratio = done_out / done_in if done_in else 1.0
    need = max(summary.bytes_in - done_in, 0) * ratio
    free = shutil.disk_usage(book.root).free if is_local(book.fs) else None
    room = f"about {need / 1e6:.1f} MB ({int(need)} bytes) more" if need else "more space"
    have = f", {free} bytes free now" if free is not None else ""
    rerun = (
        "the same --append command again" if book.appending else "the same command with --resume"
    )
    return DiskFullError(
        f"no space left on the destination {dest}: the rest of the job needs {room}{have}. "
        f"Temporary files were removed and the {len(parts)} finished tasks are kept; free "
        f"space, then run {rerun}"
    )
