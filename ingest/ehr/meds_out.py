"""The cleaned events as a MEDS dataset (https://medical-event-data-standard.github.io), beside
the token shards, so that MEDS tools (meds_reader, MEDS-Transforms) read what ingest cleaned.

Layout under `ehr/<source>/meds/` (the MEDS root): `data/bNNNN.parquet` (one file per patient
bucket, so one subject lives in one file, sorted by subject and time), `metadata/dataset.json`,
`metadata/codes.parquet` and `metadata/subject_splits.parquet`, all in the `meds` package's
schemas. What it holds is what the token shards hold: pseudonymous subject ids (the first 60 bits
of the patient pseudonym), date-shifted times, codes of the vocabulary only (any other code is
`[UNK]` and loses its value), and birth moved so that no age exceeds `age_cap` (HIPAA).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medfm import __version__
from medfm.io import atomic_write_bytes, get_fs
from medfm.shards.schema import EHR_DIR

from ..registry import IngestError
from .pipeline import YEAR_S, parquet_bytes, read_events
from .spec import EHRSpec
from .tables import BIRTH_CODE, KIND_BIRTH, KIND_EVENT, KIND_STATIC, factorize
from .vocab import Vocabulary

SPLITS = {"train": meds.train_split, "val": meds.tuning_split, "test": meds.held_out_split}


def meds_root(source: str) -> str:
    """The MEDS dataset of a source, relative to the shard set."""
    return f"{EHR_DIR}/{source}/meds"


def subject_id(pid: str) -> int:
    """A MEDS subject id (int64) from a patient pseudonym ("P" + hex): its first 60 bits."""
    return int(pid[1:16], 16)


def meds_events(table: pa.Table, vocab: Vocabulary, age_cap: float) -> pa.Table:
    """A cleaned bucket (pid, t, code, value, kind) as MEDS data rows, sorted for MEDS."""
    kind = np.asarray(table.column("kind"))
    patient, pids = factorize(table.column("pid"))  # as np.unique(..., return_inverse=True)
    pids = pids.to_pylist()
    known = np.asarray(pc.is_in(table.column("code"), value_set=pa.array(vocab.tokens)))
    codes = pc.if_else(pa.array(known), table.column("code"), "[UNK]")
    code = pc.if_else(pa.array(kind == KIND_BIRTH), BIRTH_CODE, codes)
    t = np.asarray(table.column("t").fill_null(0), np.int64).copy()
    value = np.asarray(table.column("value").fill_null(np.nan), np.float64).copy()
    value[~known] = np.nan  # a rare code's value would identify as much as the code
    _cap_births(patient, len(pids), t, kind, age_cap)
    ids = np.array([subject_id(p) for p in pids], np.int64)
    out = pa.table(
        {
            "subject_id": pa.array(ids[patient], pa.int64()),
            "time": pa.array(t * 1_000_000, pa.timestamp("us"), mask=kind == KIND_STATIC),
            "code": code,
            "numeric_value": pa.array(value, pa.float32(), mask=np.isnan(value)),
        }
    )
    # Sorted by subject, then time with static rows (null time) first, as MEDS sorts.
    first = np.where(kind == KIND_STATIC, np.iinfo(np.int64).min, t)
    out = out.append_column("_order", pa.array(first)).sort_by(
        [("subject_id", "ascending"), ("_order", "ascending"), ("code", "ascending")]
    )
    out = out.drop_columns(["_order"])
    return conform(meds.DataSchema, out)


def conform(schema: Any, table: pa.Table) -> pa.Table:
    """The table in a `meds` schema's column order and types, validated (raises if not MEDS)."""
    table = schema.align(table)
    schema.validate(table)
    return table


def _cap_births(patient: np.ndarray, n: int, t: np.ndarray, kind: np.ndarray, cap: float) -> None:
    """Move each birth (in place) so that its patient is at most `cap` years old at the last
    event (patient: each row's patient index, of n)."""
    event = kind == KIND_EVENT
    last = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last, patient[event], t[event])
    birth = np.flatnonzero(kind == KIND_BIRTH)
    latest = last[patient[birth]]
    has = latest > np.iinfo(np.int64).min
    t[birth[has]] = np.maximum(t[birth[has]], latest[has] - int(cap * YEAR_S))


def write_meds_bucket(
    k: int,
    clean_path: str,
    vocab_path: str,
    spec: EHRSpec,
    dest: str,
    source: str,
    split_of: Callable[[str], str],
) -> dict[str, Any]:
    """Write bucket k's MEDS data file; returns its relative path, subjects and codes."""
    fs, path = get_fs(clean_path)
    table = read_events(fs, path)
    vfs, vpath = get_fs(vocab_path)
    vocab = Vocabulary.from_json(vfs.cat_file(vpath).decode())
    if not table.num_rows:
        return {"rel": "", "subjects": [], "codes": []}
    events = meds_events(table, vocab, spec.age_cap)
    rel = f"{meds_root(source)}/{meds.data_subdirectory}/b{k:04d}.parquet"
    dfs, droot = get_fs(dest)
    atomic_write_bytes(dfs, f"{droot}/{rel}", parquet_bytes(events))
    pids = pc.unique(table.column("pid")).to_pylist()
    return {
        "rel": rel,
        "subjects": [[subject_id(p), SPLITS[split_of(p)]] for p in sorted(pids)],
        "codes": sorted(pc.unique(events.column("code")).to_pylist()),
    }


def write_meds_metadata(
    parts: list[dict[str, Any]], dest: str, source: str, licence: str
) -> list[str]:
    """dataset.json, codes.parquet and subject_splits.parquet; returns every MEDS file written
    (relative to the shard set), data files included."""
    root = meds_root(source)
    subjects = sorted(tuple(s) for p in parts for s in p["subjects"])
    ids = [s for s, _ in subjects]
    if len(set(ids)) != len(ids):  # 60-bit pseudonym prefixes: a clash is ~never, but refuse it
        raise IngestError("MEDS output: two patient pseudonyms share a subject id (60 bits)")
    splits = pa.table({"subject_id": pa.array(ids, pa.int64()),
                       "split": pa.array([s for _, s in subjects], pa.string())})  # fmt: skip
    codes = sorted({c for p in parts for c in p["codes"]})
    code_table = pa.table({
        "code": pa.array(codes, pa.string()),
        "description": pa.nulls(len(codes), pa.string()),
        "parent_codes": pa.nulls(len(codes), pa.list_(pa.string())),
    })  # fmt: skip
    dataset = {
        "dataset_name": source,
        "etl_name": "medfm ingest",
        "etl_version": __version__,
        "meds_version": meds.__version__,
        **({"license": licence} if licence else {}),
    }
    meds.DatasetMetadataSchema.validate(dataset)
    fs, droot = get_fs(dest)
    files = {
        meds.dataset_metadata_filepath: json.dumps(dataset, sort_keys=True, indent=1).encode(),
        meds.code_metadata_filepath: parquet_bytes(conform(meds.CodeMetadataSchema, code_table)),
        meds.subject_splits_filepath: parquet_bytes(conform(meds.SubjectSplitSchema, splits)),
    }
    for rel, data in files.items():
        atomic_write_bytes(fs, f"{droot}/{root}/{rel}", data)
    return [p["rel"] for p in parts if p["rel"]] + [f"{root}/{rel}" for rel in files]
