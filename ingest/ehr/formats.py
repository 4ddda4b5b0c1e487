"""Registered EHR formats: `event_tables` (any spec-mapped tables), `mimic_iv` and `meds`
(the same reader with a preset mapping).

Items are patient buckets. `prepare` runs on the driver before conversion: it partitions every
table file into buckets (Ray tasks), cleans each bucket and fits the vocabulary and bin edges
on train patients (Ray tasks), and writes `ehr/<source>/vocab.json` into the shard set. `read`
then tokenizes one bucket into one sample per patient (or admission). Each bucket carries an
equal share of the table files' bytes (`info["nbytes"]`): the job counts every file once, and
the conversion's ETA has bytes to go by. Each prepare pass shows its own progress line.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

from medfm.io import as_url, atomic_write_bytes, get_fs, sha256_bytes
from medfm.shards import Sample
from medfm.shards.schema import EHR_AGE, EHR_DELTA, EHR_DIR, EHR_TIME, EHR_TYPE

from ..privacy import Keyring, split_for
from ..progress import Progress, gather
from ..registry import (
    IngestError,
    PrepareContext,
    Quarantine,
    ReadContext,
    Reader,
    SourceFile,
    SourceItem,
    register_reader,
)
from ..sources import glob_regex
from .meds_out import write_meds_bucket, write_meds_metadata
from .pipeline import (
    PartitionJob,
    bucket_path,
    clean_bucket,
    merge_statistics,
    partition_file,
    read_events,
    scan_identifiers,
    tokenize_bucket,
)
from .spec import EventTable, parse_ehr_options
from .tables import quarantine_reasons, safe_name
from .vocab import Vocabulary, fit_vocabulary


class SplitOf:
    """Picklable pseudonym -> split function for Ray tasks (the shared patient-level split)."""

    def __init__(self, keyring: Keyring, fractions: list[float], seed: int):
        self.keyring, self.fractions, self.seed = keyring, fractions, seed

    def __call__(self, pid: str) -> str:
        return split_for(self.keyring, pid, self.fractions, self.seed)


def vocab_rel(source: str) -> str:
    return f"{EHR_DIR}/{source}/vocab.json"


class EHRReader(Reader):
    """Event tables -> per-patient (or per-admission) token sequences."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.ehr = parse_ehr_options(options, self.name)

    def group(self, files: list[SourceFile], scans: dict[str, Any], source: Any):
        matched = self.table_files(files)
        if not any(matched.values()):
            yield Quarantine("", "no file matches any EHR table path", source.name, "IngestError")
            return
        # A file may serve several tables (MIMIC admissions: admissions and discharges): list it
        # once, or it would be partitioned, counted and quarantined once per listing.
        unique = {f.path: f for fs in matched.values() for f in fs}
        tables = [(f.path, f.rel, f.size) for f in unique.values()]
        shares = _shares(sum(f.size for f in unique.values()), self.ehr.buckets)
        for k in range(self.ehr.buckets):
            yield SourceItem(source.name, self.name, (), info={"part": f"b{k:04d}", "bucket": k,
                             "tables": tables, "nbytes": shares[k]})  # fmt: skip

    def table_files(self, files: list[SourceFile]) -> dict[str, list[SourceFile]]:
        """Files per table name (`patients` for the patients table), by the tables' globs."""
        out: dict[str, list[SourceFile]] = {}
        specs = [(t.name, t.path) for t in self.ehr.tables]
        if self.ehr.patients:
            specs.append(("patients", self.ehr.patients.path))
        for name, pattern in specs:
            rx = glob_regex(pattern)
            out[f"@{name}"] = [f for f in files if rx.match(f.rel)]
        return out

    def prepare(self, items: list[SourceItem], ctx: PrepareContext) -> dict[str, Any]:
        """Partition, clean and fit (Ray tasks); write the vocabulary into the shard set."""
        if not items:
            return {}
        ray, src = ctx.ray, ctx.source
        tables = [SourceFile(p, r, s) for p, r, s in items[0].info["tables"]]
        jobs = self.partition_jobs(tables)
        size = {t.path: t.size for t in tables}
        sizes = [size[j.path] for j in jobs]  # a file of two tables is read by two jobs
        self.refuse_identifiers(ctx, jobs, sizes)
        namespace = ctx.spec.deid.patient_namespace
        remote = ray.remote(num_cpus=1, max_retries=3)(_partition_safe)
        tasks = [partial(remote.remote, j, self.ehr, ctx.keyring, namespace, ctx.work_dir,
                         src.root, src.storage_options) for j in jobs]  # fmt: skip
        phase = _phase(ctx, "partition", "files", len(jobs), sum(sizes))
        parts = gather(ray, tasks, phase, sizes, ctx.workers)
        quarantine = []
        uses = Counter(j.rel for j in jobs)
        for job, part in zip(jobs, parts, strict=True):
            # A file serving several tables is reported per table, each line saying which.
            which = f" (table {job.table_name})" if uses[job.rel] > 1 else ""
            if "error" in part:
                error = part["error"] + which
                quarantine.append(Quarantine(job.rel, error, src.name, part["type"]))
                continue
            for reason in quarantine_reasons(part["counts"]):
                quarantine.append(Quarantine(job.rel, reason + which, src.name, "BadRows"))
        split_of = SplitOf(ctx.keyring, ctx.spec.split.fractions, ctx.spec.split.seed)
        clean = ray.remote(num_cpus=1, max_retries=3)(clean_bucket)
        tasks = [partial(clean.remote, k, self.ehr, ctx.work_dir, split_of, ctx.spec.split.seed)
                 for k in range(self.ehr.buckets)]  # fmt: skip
        stats = gather(ray, tasks, _phase(ctx, "clean", "buckets", len(tasks)), None, ctx.workers)
        quarantine += self.before_birth(stats, jobs, src.name)
        rel = vocab_rel(src.name)
        dest_fs, dest = get_fs(ctx.dest)
        vocab_url = as_url(dest_fs, f"{dest}/{rel}")
        if ctx.kept:  # an --append: new patients are tokens of the set's vocabulary, as stored
            vfs, vpath = get_fs(ctx.kept["vocab"])
            vocab = Vocabulary.from_json(vfs.cat_file(vpath).decode())
            meds_files = []  # the MEDS dataset stays the first version's (docs/ingest.md)
        else:
            vocab = self.fit(stats)
            atomic_write_bytes(dest_fs, f"{dest}/{rel}", vocab.to_json().encode())
            meds = self.ehr.meds
            meds_files = self.write_meds(ray, ctx, vocab_url, split_of) if meds else []
        fitted = ctx.kept["record"] if ctx.kept else vocab.fitted_on
        return {
            "work": ctx.work_dir,
            "scratch": ctx.work_dir,  # every raw code and value: removed once the job is done
            "vocab": vocab_url,
            "artifacts": [rel, *meds_files],
            "inputs": {
                j.rel: p["sha256"] for j, p in zip(jobs, parts, strict=True) if "sha256" in p
            },
            "quarantine": [q.to_dict() for q in quarantine],
            "dataset": {
                "ehr": {
                    "vocab": rel,
                    "vocab_size": len(vocab.tokens),
                    "binned_codes": len(vocab.edges),
                    **{k: v for k, v in fitted.items() if k not in ("vocab", "sample_per")},
                    "sample_per": self.ehr.sample_per,
                }
            },  # fmt: skip
        }

    def refuse_identifiers(self, ctx: PrepareContext, jobs: list[PartitionJob],
                           sizes: list[int]) -> None:  # fmt: skip
        """Stop the job (exit 2) if a code column's values look like identifiers."""
        src = ctx.source
        scan = ctx.ray.remote(num_cpus=1, max_retries=3)(scan_identifiers)
        tasks = [partial(scan.remote, j, self.ehr, src.root, src.storage_options) for j in jobs]
        phase = _phase(ctx, "scan", "files", len(jobs), sum(sizes))
        found = gather(ctx.ray, tasks, phase, sizes, ctx.workers)
        bad = [(j, c, why) for j, cols in zip(jobs, found, strict=True) for c, why in cols.items()]
        if bad:
            job, column, why = bad[0]
            raise IngestError(
                f"{job.rel}: column {column!r} (table {job.table_name}) looks like an identifier "
                f"or free text: {why}; nothing was converted. List it under "
                "options.allow_columns only if it is neither"
            )

    def write_meds(self, ray: Any, ctx: PrepareContext, vocab: str, split_of: SplitOf) -> list:
        """The cleaned buckets as a MEDS dataset (Ray tasks); returns the files written."""
        write = ray.remote(num_cpus=1, max_retries=3)(write_meds_bucket)
        tasks = [partial(write.remote, k, bucket_path(ctx.work_dir, k), vocab, self.ehr,
                         ctx.dest, ctx.source.name, split_of)
                 for k in range(self.ehr.buckets)]  # fmt: skip
        parts = gather(ray, tasks, _phase(ctx, "meds", "buckets", len(tasks)), None, ctx.workers)
        return write_meds_metadata(parts, ctx.dest, ctx.source.name, ctx.source.licence)

    def partition_jobs(self, tables: list[SourceFile]) -> list[PartitionJob]:
        by_name = self.table_files(tables)
        jobs = []
        specs = [(t.name, t) for t in self.ehr.tables]
        if self.ehr.patients:
            specs.append(("patients", self.ehr.patients))
        for name, t in specs:
            joins = []
            if isinstance(t, EventTable) and t.time_from is not None:
                rx = glob_regex(t.time_from.path)
                joins = [f.path for f in tables if rx.match(f.rel)]
            for f in by_name[f"@{name}"]:
                tag = f"{safe_name(name)}-{sha256_bytes(f.rel.encode())[:12]}"
                jobs.append(PartitionJob(f.path, f.rel, t, joins, tag))
        return jobs

    def before_birth(self, stats: list[dict], jobs: list[PartitionJob], source: str) -> list:
        rel = {}
        for j in jobs:
            rel.setdefault(j.table_name, j.rel)
        total: dict[str, int] = {}
        for s in stats:
            for table, n in s.get("before_birth", {}).items():
                total[table] = total.get(table, 0) + n
        return [Quarantine(rel.get(t, t), f"{n} rows: event before birth", source, "BadRows")
                for t, n in sorted(total.items())]  # fmt: skip

    def fit(self, stats: list[dict[str, Any]]) -> Vocabulary:
        counts, codes, values = merge_statistics(stats, self.ehr)
        fitted_on = {
            "split": "train",
            "train_patients": sum(s["train_patients"] for s in stats),
            "patients": sum(s["patients"] for s in stats),
            "train_events": sum(s["train_events"] for s in stats),
        }
        return fit_vocabulary(counts, codes, values, bins=self.ehr.bins,
                              min_count=self.ehr.min_count, min_values=self.ehr.min_values,
                              fitted_on=fitted_on)  # fmt: skip

    def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        prep = ctx.stats.get(ctx.source.name) or {}
        if "vocab" not in prep:
            raise IngestError("EHR vocabulary missing: the prepare pass did not run")
        vfs, vpath = get_fs(prep["vocab"])
        vocab = Vocabulary.from_json(vfs.cat_file(vpath).decode())
        wfs, _ = get_fs(prep["work"])
        path = bucket_path(prep["work"], item.info["bucket"])
        table = read_events(wfs, path)
        inputs = prep.get("inputs", {})
        for seq in tokenize_bucket(table, vocab, self.ehr):
            yield Sample(
                key=ctx.sample_key(seq.pid, seq.admission or ""),
                kind="ehr",
                modality="EHR",
                dataset=ctx.source.name,
                patient_id=seq.pid,
                split=ctx.split(seq.pid),
                data=seq.tokens,
                study_id=seq.admission or "",
                extras={
                    EHR_AGE: seq.age,
                    EHR_TIME: seq.time,
                    EHR_DELTA: seq.delta,
                    EHR_TYPE: seq.type,
                },
                licence=ctx.source.licence,
                provenance={"inputs": inputs, "path": f"bucket {item.info['part']}"},
                meta={
                    **(
                        {"time_start": _iso(seq.t_start), "time_end": _iso(seq.t_end)}
                        if seq.events
                        else {}
                    ),
                    "events": seq.events,
                    "tokens": int(len(seq.tokens)),
                    "truncated_tokens": seq.truncated,
                    "vocab": vocab_rel(ctx.source.name),
                    "sample_per": self.ehr.sample_per,
                    "age_cap": self.ehr.age_cap,
                },
            )


def _partition_safe(job, spec, keyring, namespace, work, root, options) -> dict[str, Any]:
    """partition_file, with a bad file reported (quarantined) instead of failing the job."""
    from ..bookkeeping import scrub_reason
    from ..tasks import quiet

    quiet()
    try:
        return partition_file(job, spec, keyring, namespace, work, root, options)
    except IngestError as e:
        return {"error": str(e)[:300], "type": type(e).__name__}
    except Exception as e:  # noqa: BLE001 - a bad table is a finding, never a crash
        return {
            "error": f"unexpected {type(e).__name__}: {scrub_reason(str(e))}",
            "type": "UnexpectedError",
        }


def _shares(total: int, n: int) -> list[int]:
    """`total` bytes split into `n` near-equal shares that add up to it exactly."""
    return [total // n + (k < total % n) for k in range(n)]


def _phase(ctx: PrepareContext, name: str, unit: str, n: int, nbytes: int = 0) -> Progress:
    """A prepare pass's progress (ETA by bytes where they are known, else by count)."""
    return Progress(nbytes, n, phase=f"{ctx.source.name} {name}", unit=unit,
                    enabled=ctx.progress)  # fmt: skip


def _iso(seconds: int) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=int(seconds))).isoformat()


register_reader("event_tables")(EHRReader)
register_reader("mimic_iv")(EHRReader)
register_reader("meds")(EHRReader)
