"""The out-of-core EHR passes. Nothing here holds a whole table in memory:

1. `partition_file` (one Ray task per table file) streams record batches, maps them to events
   (pseudonymized, date-shifted) and appends them to per-bucket Parquet files, the bucket
   being a hash of the patient pseudonym: an external group-by patient.
2. `clean_bucket` (one task per bucket) sorts a bucket by patient and time, drops events
   before birth (counted), and returns the train-split code counts and a bottom-k value
   sample per code: the only inputs of the vocabulary and the bin edges.
3. `tokenize_bucket` (inside the conversion task of a bucket) turns each patient's (or
   admission's) events into token ids with time, age and type arrays.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medfm.io import atomic_write_bytes, commit, get_fs, sha256_file, tmp_name

from ..privacy import Keyring
from .spec import EHRSpec, EventTable, PatientTable
from .tables import (
    EVENT_SCHEMA,
    KIND_BIRTH,
    KIND_EVENT,
    KIND_STATIC,
    SCAN_ROWS,
    Pseudonymizer,
    event_batches,
    factorize,
    identifier_reason,
    load_time_join,
    open_batches,
    patient_batches,
)
from .vocab import (
    SPECIAL,
    TYPE_CODE,
    TYPE_INTERVAL,
    TYPE_SPECIAL,
    TYPE_STATIC,
    TYPE_VALUE,
    Vocabulary,
    bottom_k,
    interval_token,
)

YEAR_S = 365.25 * 86400
BIRTH_SLACK_S = 366 * 86400  # birth years estimated from an age are exact to a year only
# Work files (bucket parts, clean buckets) are read back once or twice and then removed: Arrow
# IPC files, which need no encoding (about a third of Parquet's CPU to write and read), their
# buffers zstd-compressed (three times Parquet's size, a third of uncompressed IPC's).
SCRATCH_IPC = {"compression": "zstd", "use_threads": False}


def bucket_of(pids: list[str], buckets: int) -> np.ndarray:
    return np.array([int(p[1:9], 16) % buckets for p in pids], np.int64)


def buckets_of_rows(pid: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """bucket_of for every row of a pseudonym column, computed once per distinct patient."""
    rank, distinct = factorize(pid)
    return np.r_[bucket_of(distinct.to_pylist(), buckets), -1][rank]


@dataclass
class PartitionJob:
    """One table file to partition (picklable: it travels to a Ray task)."""

    path: str  # fsspec path of the table file
    rel: str  # relative to the source root (for quarantine records)
    table: EventTable | PatientTable
    join_paths: list[str]  # time_from table files, if any
    tag: str  # unique, deterministic name of this job's bucket files

    @property
    def table_name(self) -> str:
        return getattr(self.table, "name", "patients")


def scan_identifiers(
    job: PartitionJob, spec: EHRSpec, source_root: str, storage_options: dict | None = None
) -> dict[str, str]:
    """{column: reason} for the code columns of one table file whose first SCAN_ROWS values
    look like identifiers. Runs before anything is partitioned, so a refused column's values
    are never written; columns in `allow_columns` are not scanned."""
    cols = [c for c in job.table.code_columns() if c not in spec.allow_columns]
    if not cols:
        return {}
    fs, _ = get_fs(source_root, **(storage_options or {}))
    batches, rows = [], 0
    try:
        for batch in open_batches(fs, job.path, cols, min(spec.batch_rows, SCAN_ROWS)):
            batches.append(batch)
            rows += batch.num_rows
            if rows >= SCAN_ROWS:
                break
    except Exception:  # noqa: BLE001 - unreadable, or a column missing: the partition pass
        return {}  # quarantines the file with its reason
    if not batches:
        return {}
    table = pa.Table.from_batches(batches)
    found = {c: identifier_reason(table.column(c).combine_chunks()) for c in cols}
    return {c: why for c, why in found.items() if why}


def partition_file(
    job: PartitionJob,
    spec: EHRSpec,
    keyring: Keyring,
    namespace: str,
    work: str,
    source_root: str,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream one table file into the bucket files; returns row counts by outcome."""
    done = f"{work}/parts/{job.tag}.json"
    wfs, _ = get_fs(work)
    if wfs.exists(done):  # resume: this file was partitioned by an earlier run
        return json.loads(wfs.cat_file(done))
    fs, _ = get_fs(source_root, **(storage_options or {}))
    pseudo = Pseudonymizer(keyring, namespace)
    counts: Counter = Counter()
    joined = None
    t = job.table
    if isinstance(t, EventTable) and t.time_from is not None:
        joined = load_time_join(fs, job.join_paths, t.time_from.key, t.time_from.time,
                                spec.batch_rows)  # fmt: skip
    writers: dict[int, tuple[str, str, pq.ParquetWriter, Any]] = {}
    rows = 0
    try:
        for batch in open_batches(fs, job.path, t.columns(), spec.batch_rows):
            if isinstance(t, EventTable):
                events = event_batches(batch, t, pseudo, joined, counts)
            else:
                events = patient_batches(batch, t, pseudo, counts)
            rows += batch.num_rows
            _write_buckets(events, spec.buckets, work, job.tag, wfs, writers)
        for final, tmp, w, f in writers.values():
            w.close()
            f.close()
            commit(wfs, tmp, final)
    except BaseException:
        for _, tmp, _w, f in writers.values():
            f.close()
            if wfs.exists(tmp):
                wfs.rm(tmp)
        raise
    digest = sha256_file(fs, job.path)[0]  # input hash for provenance, in parallel tasks
    out = {"rel": job.rel, "rows": rows, "counts": dict(counts), "sha256": digest}
    atomic_write_bytes(wfs, done, json.dumps(out, sort_keys=True).encode())
    return out


def _write_buckets(events: pa.Table, buckets: int, work: str, tag: str, wfs, writers) -> None:
    if not events.num_rows:
        return
    b = buckets_of_rows(events.column("pid"), buckets)
    for k in np.unique(b):
        part = events.filter(pa.array(b == k))
        if k not in writers:
            final = f"{work}/buckets/b{k:04d}/{tag}.arrow"
            wfs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            tmp = tmp_name(final)
            f = wfs.open(tmp, "wb")
            writer = pa.ipc.new_file(f, EVENT_SCHEMA, options=pa.ipc.IpcWriteOptions(**SCRATCH_IPC))
            writers[k] = (final, tmp, writer, f)
        writers[k][2].write_table(part)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_events(fs: Any, path: str) -> pa.Table:
    """A work file (Arrow IPC) of events. Single-threaded: pyarrow 26's threaded reads can
    abort at interpreter exit (see manifest.py)."""
    reader = pa.ipc.open_file(pa.BufferReader(fs.cat_file(path)),
                              options=pa.ipc.IpcReadOptions(use_threads=False))  # fmt: skip
    return reader.read_all()


def events_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(**SCRATCH_IPC)) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def bucket_path(work: str, k: int) -> str:
    return f"{work}/clean/b{k:04d}.arrow"


def clean_bucket(
    k: int, spec: EHRSpec, work: str, split_of: Callable[[str], str], seed: int
) -> dict[str, Any]:
    """Sort bucket k, drop events before birth, write it; return train counts and values."""
    wfs, _ = get_fs(work)
    stats_path = f"{work}/clean/b{k:04d}.json"
    if wfs.exists(stats_path):
        return json.loads(wfs.cat_file(stats_path))
    files = sorted(wfs.glob(f"{work}/buckets/b{k:04d}/*.arrow"))
    files = [f for f in files if ".tmp-" not in f]
    table = (
        pa.concat_tables([read_events(wfs, f) for f in files])
        if files
        else EVENT_SCHEMA.empty_table()
    )
    if spec.birth_code:  # MEDS-style birth events become birth rows
        is_birth = pc.equal(table.column("code"), spec.birth_code).fill_null(False)
        kind = pc.if_else(is_birth, pa.scalar(KIND_BIRTH, pa.int8()), table.column("kind"))
        table = table.set_column(table.schema.get_field_index("kind"), "kind", kind)
    table, before = drop_before_birth(table, spec)
    table = sort_events(table)
    atomic_write_bytes(wfs, bucket_path(work, k), events_bytes(table))
    out, sample = train_statistics(table, spec, split_of, seed + k)
    # The value sample (up to bin_sample values per code) goes to its own Parquet file: as
    # JSON it would cost more to encode and decode than the rest of this pass.
    out["values"] = f"{work}/clean/b{k:04d}.values.arrow"
    atomic_write_bytes(wfs, out["values"], events_bytes(sample))
    out["before_birth"] = before
    atomic_write_bytes(wfs, stats_path, json.dumps(out, sort_keys=True).encode())
    return out


def sort_events(table: pa.Table) -> pa.Table:
    """The table sorted by patient, time (static rows, with null time, last) and code, stably:
    as `sort_by` on those columns, on integer keys instead of strings."""
    pid, _ = factorize(table.column("pid"))
    code, _ = factorize(table.column("code"))
    t = table.column("t")
    keys = pa.table({"pid": pid, "null": pc.is_null(t), "t": t.fill_null(0), "code": code})
    return table.take(pc.sort_indices(keys, [(c, "ascending") for c in keys.column_names]))


def per_patient(table: pa.Table, of_patient: Callable[[str], Any], missing: Any) -> np.ndarray:
    """of_patient(pseudonym) for every row, computed once per distinct patient."""
    rank, distinct = factorize(table.column("pid"))
    return np.array([of_patient(p) for p in distinct.to_pylist()] + [missing])[rank]


def births(table: pa.Table) -> dict[str, int]:
    """Earliest birth time per patient."""
    b = table.filter(pc.equal(table.column("kind"), KIND_BIRTH))
    out: dict[str, int] = {}
    for pid, t in zip(b.column("pid").to_pylist(), b.column("t").to_pylist(), strict=True):
        if t is not None and (pid not in out or t < out[pid]):
            out[pid] = t
    return out


def drop_before_birth(table: pa.Table, spec: EHRSpec) -> tuple[pa.Table, dict[str, int]]:
    """Remove events dated before the patient's birth; returns (table, counts per table)."""
    born = births(table)
    if not born or not table.num_rows:
        return table, {}
    slack = BIRTH_SLACK_S if spec.patients and spec.patients.age else 0
    unknown = np.iinfo(np.int64).min // 2
    birth = per_patient(table, lambda p: born.get(p, unknown), unknown).astype(np.int64)
    t = np.asarray(table.column("t").fill_null(np.iinfo(np.int64).max))
    kind = np.asarray(table.column("kind"))
    bad = (kind == KIND_EVENT) & (t < birth - slack)
    if not bad.any():
        return table, {}
    counts = Counter(table.column("table").filter(pa.array(bad)).to_pylist())
    return table.filter(pa.array(~bad)), dict(counts)


def train_statistics(
    table: pa.Table, spec: EHRSpec, split_of: Callable[[str], str], seed: int
) -> tuple[dict[str, Any], pa.Table]:
    """Code counts over train-split patients only, and a bottom-k value sample per code
    (a table of code, value, prio, sorted by code and prio)."""
    patient, pids = factorize(table.column("pid"))
    is_train = np.array([split_of(p) == "train" for p in pids.to_pylist()] + [False], bool)
    train = is_train[patient]
    kind = np.asarray(table.column("kind"))
    counted = train & (kind != KIND_BIRTH)
    code, distinct = factorize(table.column("code"))  # integer codes, in the strings' order
    n = np.bincount(code[counted], minlength=len(distinct))
    seen = np.flatnonzero(n)
    counts = dict(zip(distinct.take(pa.array(seen)).to_pylist(), n[seen].tolist(), strict=True))
    values = np.asarray(table.column("value").fill_null(np.nan))
    has = counted & np.isfinite(values)
    prio = np.random.default_rng(seed).random(int(has.sum()))
    c, v, p = bottom_k(code[has], values[has], prio, spec.bin_sample)
    sample = pa.table({"code": distinct.take(pa.array(c, pa.int64())), "value": v, "prio": p})
    return {
        "counts": counts,
        "train_patients": int(is_train.sum()),
        "patients": len(pids),
        "train_events": int(counted.sum()),
    }, sample


@dataclass
class Sequence:
    """One patient's (or admission's) tokens and per-token arrays."""

    pid: str
    admission: str | None
    tokens: np.ndarray  # int32
    age: np.ndarray  # float32 years (-1 unknown), capped
    time: np.ndarray  # float32 hours since the sequence's first event
    delta: np.ndarray  # float32 hours since the previous event
    type: np.ndarray  # uint8 token types
    t_start: int
    t_end: int
    events: int
    truncated: int


def tokenize_bucket(table: pa.Table, vocab: Vocabulary, spec: EHRSpec) -> Iterator[Sequence]:
    """Token sequences of a cleaned, sorted bucket, one per patient or admission."""
    born = births(table)
    kind = np.asarray(table.column("kind"))
    # Patients, codes and admissions as integer ranks (ordered as their strings): every
    # per-row step below is an array operation, and each string is looked up once.
    pid_rank, pid_names = factorize(table.column("pid"))
    pid_names = np.asarray(pid_names.to_numpy(zero_copy_only=False), dtype=object)
    code_rank, code_names = factorize(table.column("code"))
    ids = np.array([vocab.id(c) for c in code_names.to_pylist()] + [vocab.unk], np.int64)
    static: dict[str, list[int]] = {}
    is_static = kind == KIND_STATIC
    for p, c in zip(pid_rank[is_static], ids[code_rank[is_static]], strict=True):
        static.setdefault(pid_names[p], []).append(int(c))
    ev = np.flatnonzero(kind == KIND_EVENT)
    pid = pid_rank[ev]
    t = np.asarray(table.column("t").fill_null(0))[ev]
    code = code_rank[ev]
    value = np.asarray(table.column("value").fill_null(np.nan))[ev]
    adm_rank, adm_names = factorize(table.column("adm"))
    adm_names = np.asarray(adm_names.to_numpy(zero_copy_only=False), dtype=object)
    adm = adm_rank[ev]
    if spec.sample_per == "admission":
        has = adm < len(adm_names)  # null admissions rank last
        pid, t, code, value, adm = pid[has], t[has], code[has], value[has], adm[has]
        order = np.lexsort((t, adm, pid))
        pid, t, code, value, adm = pid[order], t[order], code[order], value[order], adm[order]
        changed = (pid[1:] != pid[:-1]) | (adm[1:] != adm[:-1])
    else:
        changed = pid[1:] != pid[:-1]
    code_id = ids[code]
    bin_id = _bins(code, value, code_names, vocab)
    new = np.r_[True, changed] if len(t) else np.zeros(0, bool)
    gap = np.r_[0, np.diff(t)] if len(t) else np.zeros(0, np.int64)
    gap[new] = 0
    att = interval_token(gap) if spec.time_tokens else np.full(len(t), -1)
    att_id = np.where(att >= 0, len(SPECIAL) + att, -1)  # interval tokens follow the specials
    mat = np.stack([att_id, code_id, bin_id], axis=1)
    keep = mat >= 0
    ev_of_tok, slot = np.nonzero(keep)  # each token's event, and which of the three it is
    tok, typ = mat[keep], np.array([TYPE_INTERVAL, TYPE_CODE, TYPE_VALUE])[slot]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(t)]
    tok_bounds = np.searchsorted(ev_of_tok, np.r_[starts, len(t)])
    for a, b, ta, tb in zip(starts, ends, tok_bounds[:-1], tok_bounds[1:], strict=True):
        p = pid_names[pid[a]]
        yield _sequence(p, adm_names[adm[a]] if spec.sample_per == "admission" else None,
                        tok[ta:tb], typ[ta:tb], t[ev_of_tok[ta:tb]], t[a:b],
                        static.get(p, []), born.get(p), vocab, spec)  # fmt: skip
    if spec.sample_per == "patient":  # known patients without events still get a sequence
        empty = np.zeros(0, np.int64)
        for p in sorted((set(static) | set(born)) - set(pid_names[np.unique(pid)].tolist())):
            yield _sequence(p, None, empty, empty, empty, empty, static.get(p, []),
                            born.get(p), vocab, spec)  # fmt: skip


def _bins(code: np.ndarray, value: np.ndarray, names: pa.Array, vocab: Vocabulary) -> np.ndarray:
    """Value-bin token per event (-1: no value, or a code without bins); code: ranks into
    names."""
    out = np.full(len(code), -1, np.int64)
    has = np.flatnonzero(np.isfinite(value))
    if not len(has):
        return out
    has = has[np.argsort(code[has], kind="stable")]  # events grouped by code
    starts = np.r_[0, np.flatnonzero(np.diff(code[has])) + 1, len(has)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        c = int(code[has[a]])
        edges = vocab.edge_arrays.get(names[c].as_py()) if c < len(names) else None
        if edges is None:
            continue
        idx = has[a:b]
        tokens = np.array([vocab.bin_token(k) for k in range(len(edges) + 1)], np.int64)
        out[idx] = tokens[np.searchsorted(edges, value[idx], side="right")]
    return out


def _sequence(pid, adm, tok, typ, tok_t, ev_t, static_ids, birth, vocab, spec) -> Sequence:
    t0 = int(ev_t[0]) if len(ev_t) else 0
    truncated = 0
    prefix = [vocab.id("[CLS]")] + static_ids
    if spec.max_tokens and len(prefix) + len(tok) > spec.max_tokens:
        keep = max(spec.max_tokens - len(prefix), 0)
        truncated = len(tok) - keep
        tok, typ, tok_t = tok[len(tok) - keep :], typ[len(typ) - keep :], tok_t[len(tok_t) - keep :]
    tokens = np.r_[prefix, tok].astype(np.int32)
    types = np.r_[[TYPE_SPECIAL], [TYPE_STATIC] * len(static_ids), typ].astype(np.uint8)
    times = np.r_[[t0] * len(prefix), tok_t].astype(np.int64)
    delta = np.r_[0, np.diff(times)] / 3600.0
    if birth is None or not len(ev_t):
        age = np.full(len(times), -1.0)
    else:
        age = (times - birth) / YEAR_S
        age = np.where(age > spec.age_cap - 1, spec.age_cap, np.maximum(age, 0.0))
    return Sequence(
        pid,
        adm,
        tokens,
        age.astype(np.float32),
        ((times - t0) / 3600.0).astype(np.float32),
        delta.astype(np.float32),
        types,
        t0,
        int(ev_t[-1]) if len(ev_t) else t0,
        len(ev_t),
        truncated,
    )


def merge_statistics(
    parts: list[dict[str, Any]], spec: EHRSpec
) -> tuple[Counter, np.ndarray, np.ndarray]:
    """Train code counts and the merged value sample (codes, values; grouped by code)."""
    counts: Counter = Counter()
    samples = []
    for p in parts:
        counts.update(p["counts"])
        fs, path = get_fs(p["values"])
        samples.append(read_events(fs, path))
    sample = pa.concat_tables(samples)
    if not sample.num_rows:
        return counts, np.zeros(0, str), np.zeros(0)
    code, distinct = factorize(sample.column("code"))
    c, v, _ = bottom_k(code, np.asarray(sample.column("value")), np.asarray(sample.column("prio")),
                       spec.bin_sample)  # fmt: skip
    names = distinct.to_numpy(zero_copy_only=False)  # object: a fixed-width str copy is slow
    order = np.argsort(c, kind="stable")  # grouped by code, as fit_vocabulary wants them
    return counts, names[c[order]], v[order]
