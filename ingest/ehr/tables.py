"""Streaming event extraction: read an event table in record batches (never whole), map its
columns to (patient, time, code, value, admission), pseudonymize and date-shift on the way.

Rows that cannot be used are counted by reason (quarantined as "N rows: reason"), never
silently dropped. Patient ids and admission ids leave this module only as keyed pseudonyms.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..privacy import Keyring
from ..registry import IngestError, UnreadableInput
from .spec import TEMPLATE_FIELD, EventTable, PatientTable

KIND_EVENT, KIND_STATIC, KIND_BIRTH = 0, 1, 2
BIRTH_CODE = "MEDS_BIRTH"
EVENT_SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("t", pa.int64()),  # seconds since 1970 after the patient's date shift; null = static
        ("code", pa.string()),
        ("value", pa.float64()),
        ("adm", pa.string()),
        ("kind", pa.int8()),
        ("table", pa.string()),
    ]
)
ISO_8601 = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$"
ISO_ZONE = r"[T ][0-9:.]+(Z|[+-]\d{2}(:?\d{2})?)$"
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
MISSING = "UNK"  # an empty code-template field renders as this (MEDS-ETL convention)
# Values that are identifiers whatever their column is called. Code-template columns are
# checked on the first SCAN_ROWS values of every file before anything is partitioned.
IDENTIFIER_PATTERNS = {
    "SSN": r"^\d{3}-\d{2}-\d{4}$",
    "phone number": r"^(\+?\d{1,3}[\s.-]?)?(\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}$",
    "e-mail address": r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$",
}
SCAN_ROWS = 10000
FREE_TEXT_MIN_VALUES = 100  # fewer values cannot tell names from codes
FREE_TEXT_UNIQUE = 0.5  # share of distinct values above which mixed-case text is free text


class Pseudonymizer:
    """Raw patient id -> (pseudonym, date shift in seconds), cached per unique id."""

    def __init__(self, keyring: Keyring, namespace: str):
        self.keyring, self.namespace = keyring, namespace
        self._cache: dict[str, tuple[str, int]] = {}
        self._admissions: dict[str, str] = {}

    def __call__(self, raw: str) -> tuple[str, int]:
        hit = self._cache.get(raw)
        if hit is None:
            pid = self.keyring.patient(raw, self.namespace)
            hit = (pid, self.keyring.shift_days(raw) * 86400)
            self._cache[raw] = hit
        return hit

    def admission(self, raw: str) -> str:
        hit = self._admissions.get(raw)
        if hit is None:
            hit = self._admissions[raw] = self.keyring.token("admission", self.namespace, raw)[:20]
        return hit


def open_batches(
    fs: Any, path: str, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Stream the wanted columns of a CSV(.gz) or Parquet file as record batches.

    CSV columns are read as raw bytes so that one non-UTF-8 value costs one row, not the file.
    """
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        pf = pq.ParquetFile(fs.open(path, "rb"))
        _require(name, columns, pf.schema_arrow.names)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
        return
    raw = fs.open(path, "rb")
    stream = pa.CompressedInputStream(raw, "gzip") if name.endswith(".gz") else raw
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                include_missing_columns=True,
                column_types={c: pa.binary() for c in columns},
            ),
        )
        _require(name, columns, _present_columns(fs, path, name))
        for block in reader:  # 4 MiB blocks: memory stays flat whatever the file size
            for start in range(0, block.num_rows, batch_rows):
                yield block.slice(start, batch_rows)
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise UnreadableInput(f"{name}: unreadable table ({_first_line(e)})") from None
    finally:
        raw.close()


def _present_columns(fs: Any, path: str, name: str) -> list[str]:
    with fs.open(path, "rb") as raw:
        stream = pa.CompressedInputStream(raw, "gzip") if name.endswith(".gz") else raw
        head = stream.read(1 << 16)
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableInput(f"{name}: header row is not UTF-8") from None
    return [c.strip().strip('"') for c in text.split(",")]


def _require(name: str, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise IngestError(f"{name}: missing column(s) {missing}")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200]


def as_strings(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A binary/string column as UTF-8 strings, plus a mask of rows that were not valid UTF-8."""
    bad = np.zeros(len(col), bool)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col, bad
    if not pa.types.is_binary(col.type):
        return pc.cast(col, pa.string()), bad
    try:
        return pc.cast(col, pa.string()), bad
    except pa.ArrowInvalid:
        values = []
        for i, v in enumerate(col.to_pylist()):
            try:
                values.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
                bad[i] = True
        return pa.array(values, pa.string()), bad


def factorize(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(rank of each row's value among the distinct values, distinct values in Arrow's sort
    order): integer keys that sort, group and compare as the values do. Nulls rank last."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    order = np.asarray(pc.sort_indices(enc.dictionary))
    rank = np.empty(len(order) + 1, np.int64)
    rank[order] = np.arange(len(order))
    rank[len(order)] = len(order)
    return rank[np.asarray(enc.indices.fill_null(len(order)))], enc.dictionary.take(order)


def on_distinct(col: pa.Array, fn) -> tuple[np.ndarray, ...]:
    """fn (an element-wise function returning numpy arrays) applied to the distinct values of
    col only and spread back to its rows: repeated values (times, codes, ids) cost once.
    A null row gets the value fn gives a null."""
    rank, distinct = factorize(col)
    out = fn(pa.concat_arrays([distinct, pa.nulls(1, distinct.type)]))
    return tuple(o[rank] for o in out)


def parse_times(col: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds int64, missing mask, invalid mask) from a timestamp, text or numeric column.

    Text is ISO-8601: a date, or a date and time (`T` or space; minutes, seconds and a fraction
    optional) with an optional `Z` or `+hh:mm`/`-hhmm`/`+hh` offset, which is converted to UTC;
    times without an offset are taken as they stand. Numbers need `time_unit` (an epoch offset).
    """
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        us = pc.cast(pc.cast(col, pa.timestamp("us", tz=getattr(col.type, "tz", None))), pa.int64())
        missing = np.asarray(pc.is_null(us))
        secs = np.floor_divide(np.asarray(us.fill_null(0)), 1_000_000)
        return secs, missing, np.zeros(len(col), bool)
    strings, _ = as_strings(col)
    return on_distinct(strings, lambda distinct: _parse_text_times(distinct, unit))


def _parse_text_times(strings: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    strings = pc.utf8_trim_whitespace(strings)
    missing = np.asarray(pc.or_kleene(pc.is_null(strings), pc.equal(strings, "")).fill_null(True))
    if unit:
        ok = pc.match_substring_regex(strings, NUMBER).fill_null(False)
        nums = pc.cast(pc.if_else(ok, strings, None), pa.float64())
        secs = np.floor(np.asarray(nums.fill_null(np.nan)) * UNIT_SECONDS[unit])
        invalid = ~missing & (~np.isfinite(secs) | (secs < 0))  # NaN or negative offsets
        return np.where(np.isfinite(secs), secs, 0).astype(np.int64), missing, invalid
    us = _iso_microseconds(strings)
    invalid = ~missing & np.isnan(us)
    secs = np.floor_divide(np.where(np.isnan(us), 0, us), 1_000_000).astype(np.int64)
    return secs, missing, invalid


def _iso_microseconds(strings: pa.Array) -> np.ndarray:
    """ISO-8601 strings -> float64 microseconds since 1970 UTC (NaN where not ISO-8601).

    Arrow parses the whole array at once; zoned and naive values are cast separately (a zoned
    cast refuses naive strings and vice versa), and a batch with an impossible date (February
    30) falls back to one value at a time so that only that row is invalid."""
    shaped = pc.match_substring_regex(strings, ISO_8601).fill_null(False)
    text = pc.replace_substring_regex(strings, r"(\.\d{6})\d+", r"\1")  # Arrow parses to us
    zoned = pc.and_(shaped, pc.match_substring_regex(text, ISO_ZONE).fill_null(False))
    naive = pc.and_(shaped, pc.invert(zoned))
    out = np.full(len(strings), np.nan)
    for mask, tz in ((naive, None), (zoned, "UTC")):
        idx = np.flatnonzero(np.asarray(mask))
        if len(idx):
            out[idx] = _cast_us(text.take(pa.array(idx)), pa.timestamp("us", tz=tz))
    return out


def _cast_us(strings: pa.Array, target: pa.DataType) -> np.ndarray:
    try:
        return np.asarray(pc.cast(pc.cast(strings, target), pa.int64()), np.float64)
    except pa.ArrowInvalid:
        out = np.full(len(strings), np.nan)
        for i, v in enumerate(strings.to_pylist()):
            try:
                out[i] = pc.cast(pc.cast(pa.array([v]), target), pa.int64())[0].as_py()
            except pa.ArrowInvalid:
                pass  # this value alone is invalid
        return out


def identifier_reason(values: pa.Array) -> str:
    """Why a column's values look like identifiers, or "" if they do not: SSN, phone or e-mail
    patterns in at least 1 % of the values, or high-cardinality free text (mostly distinct,
    mostly mixed-case words, as names and addresses are; codes are upper case or digits)."""
    strings, _ = as_strings(values)
    strings = pc.drop_null(pc.utf8_trim_whitespace(strings))
    strings = strings.filter(pc.not_equal(strings, ""))
    n = len(strings)
    if not n:
        return ""
    for what, pattern in IDENTIFIER_PATTERNS.items():
        hits = pc.sum(pc.match_substring_regex(strings, pattern)).as_py() or 0
        if hits and hits >= 0.01 * n:
            return f"{hits} of {n} values look like a {what}"
    distinct = pc.unique(strings)
    if n < FREE_TEXT_MIN_VALUES or len(distinct) <= FREE_TEXT_UNIQUE * n:
        return ""
    mixed = pc.sum(pc.match_substring_regex(distinct, "[a-z]")).as_py() or 0
    if mixed > 0.5 * len(distinct):
        return f"{len(distinct)} distinct values in {n}, mostly mixed-case text (free text)"
    return ""


def render_code(template: str, batch: pa.RecordBatch, bad: np.ndarray) -> pa.Array:
    """Fill a code template ("ICD{icd_version}//{icd_code}") from the batch's columns."""
    parts: list[Any] = []
    pos = 0
    for m in TEMPLATE_FIELD.finditer(template):
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        col, b = as_strings(batch.column(m.group(1)))
        bad |= b
        col = pc.utf8_trim_whitespace(col)
        col = pc.if_else(pc.equal(col, "").fill_null(True), MISSING, col)
        parts.append(col)
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    if not any(isinstance(p, pa.Array) for p in parts):
        return pa.array([template] * batch.num_rows, pa.string())
    return pc.binary_join_element_wise(*parts, "")


def parse_values(col: pa.Array) -> np.ndarray:
    """Numeric values as float64 (NaN where the value is empty, text or not finite)."""
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        v = np.asarray(pc.cast(col, pa.float64()).fill_null(np.nan))
    else:
        strings, _ = as_strings(col)
        (v,) = on_distinct(strings, lambda distinct: (_text_values(distinct),))
    return np.where(np.isfinite(v), v, np.nan)


def _text_values(strings: pa.Array) -> np.ndarray:
    ok = pc.match_substring_regex(strings, NUMBER).fill_null(False)
    return np.asarray(pc.cast(pc.if_else(ok, strings, None), pa.float64()).fill_null(np.nan))


def load_time_join(fs: Any, paths: list[str], key: str, time: str, batch_rows: int) -> dict:
    """key -> seconds, streamed from the joined table (an admissions-sized table)."""
    out: dict[str, int] = {}
    for path in paths:
        for batch in open_batches(fs, path, [key, time], batch_rows):
            keys, _ = as_strings(batch.column(key))
            secs, missing, invalid = parse_times(batch.column(time), "")
            for k, s, ok in zip(keys.to_pylist(), secs, ~(missing | invalid), strict=True):
                if k is not None and ok:
                    out[k] = int(s)
    return out


def event_batches(
    batch: pa.RecordBatch,
    table: EventTable,
    pseudo: Pseudonymizer,
    joined: dict | None,
    counts: Counter,
) -> pa.Table:
    """Map one batch of an event table onto EVENT_SCHEMA; count the rows it refuses."""
    n = batch.num_rows
    bad_bytes = np.zeros(n, bool)
    raw_pid, b = as_strings(batch.column(table.patient))
    bad_bytes |= b
    pid_missing = np.asarray(
        pc.or_kleene(pc.is_null(raw_pid), pc.equal(raw_pid, "")).fill_null(True)
    )
    secs, t_missing, t_invalid = _event_times(batch, table, joined, bad_bytes)
    code = render_code(table.code, batch, bad_bytes)
    value = parse_values(batch.column(table.value)) if table.value else np.full(n, np.nan)
    adm = _admissions(batch, table, pseudo, bad_bytes)
    kind = np.zeros(n, np.int8)
    keep = ~bad_bytes & ~pid_missing & ~t_invalid
    if table.null_time == "static":
        kind[t_missing] = KIND_STATIC
    elif table.null_time == "skip":
        counts["skipped: no time (expected for this table)"] += int((keep & t_missing).sum())
        keep &= ~t_missing
    else:
        counts["missing time"] += int((keep & t_missing).sum())
        keep &= ~t_missing
    counts["not UTF-8"] += int(bad_bytes.sum())
    counts["missing patient id"] += int((~bad_bytes & pid_missing).sum())
    counts["invalid time (unparsable, NaN or negative)"] += int((~bad_bytes & t_invalid).sum())
    return _assemble(raw_pid, secs, code, value, adm, kind, keep, table.name, pseudo)


def _event_times(batch, table, joined, bad_bytes):
    n = batch.num_rows
    secs, missing, invalid = np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    for name in table.time:  # first non-empty time column wins
        s, m, inv = parse_times(batch.column(name), table.time_unit)
        take = missing & ~m
        secs[take], invalid[take], missing[take] = s[take], inv[take], False
    if table.time_from is not None and joined is not None:
        keys, b = as_strings(batch.column(table.time_from.key))
        bad_bytes |= b
        rank, distinct = factorize(keys)
        found = [joined.get(k) for k in distinct.to_pylist()] + [None]
        hit = np.array([f is not None for f in found])[rank] & missing
        secs[hit] = np.array([f or 0 for f in found], np.int64)[rank][hit]
        missing[hit] = False
    return secs, missing, invalid


def _admissions(batch, table, pseudo, bad_bytes) -> pa.Array:
    """Admission pseudonyms (null where there is none), computed once per distinct id."""
    if not table.admission:
        return pa.nulls(batch.num_rows, pa.string())
    col, b = as_strings(batch.column(table.admission))
    bad_bytes |= b
    rank, distinct = factorize(col)
    names = [pseudo.admission(v) if v else None for v in distinct.to_pylist()] + [None]
    return pa.array(names, pa.string()).take(pa.array(rank))


def _assemble(raw_pid, secs, code, value, adm, kind, keep, table_name, pseudo) -> pa.Table:
    idx = pa.array(np.flatnonzero(keep))
    # Pseudonyms and date shifts once per distinct raw id (keep excludes null ids).
    rank, distinct = factorize(raw_pid.take(idx))
    mapped = [pseudo(r.strip()) for r in distinct.to_pylist()]
    pid = pa.array([m[0] for m in mapped], pa.string()).take(pa.array(rank))
    shift = np.array([m[1] for m in mapped], np.int64)[rank]
    rows = np.asarray(idx)
    t = pa.array(secs[rows] + shift, pa.int64(), mask=kind[rows] == KIND_STATIC)
    return pa.table(
        {
            "pid": pid,
            "t": t,
            "code": code.take(idx),
            "value": pa.array(value[rows], pa.float64(), mask=np.isnan(value[rows])),
            "adm": adm.take(idx),
            "kind": pa.array(kind[rows], pa.int8()),
            "table": pa.repeat(pa.scalar(table_name, pa.string()), len(rows)),
        },
        schema=EVENT_SCHEMA,
    )


def patient_batches(
    batch: pa.RecordBatch, table: PatientTable, pseudo: Pseudonymizer, counts: Counter
) -> pa.Table:
    """Birth rows and static-code rows from one batch of the patients table."""
    n = batch.num_rows
    bad = np.zeros(n, bool)
    raw_pid, b = as_strings(batch.column(table.patient))
    bad |= b
    pid_missing = np.asarray(
        pc.or_kleene(pc.is_null(raw_pid), pc.equal(raw_pid, "")).fill_null(True)
    )
    keep = ~bad & ~pid_missing
    counts["not UTF-8"] += int(bad.sum())
    counts["missing patient id"] += int((~bad & pid_missing).sum())
    pieces = []
    no_adm = pa.nulls(n, pa.string())
    birth, birth_ok = _birth_seconds(batch, table, counts, keep)
    if birth is not None:
        pieces.append(_assemble(raw_pid, birth, pa.array([BIRTH_CODE] * n), np.full(n, np.nan),
                                no_adm, np.full(n, KIND_BIRTH, np.int8), keep & birth_ok,
                                "patients", pseudo))  # fmt: skip
    for template in table.codes:
        code = render_code(template, batch, bad)
        static = np.full(n, KIND_STATIC, np.int8)
        pieces.append(_assemble(raw_pid, np.zeros(n, np.int64), code, np.full(n, np.nan),
                                no_adm, static, keep & ~bad, "patients", pseudo))  # fmt: skip
    return pa.concat_tables(pieces) if pieces else EVENT_SCHEMA.empty_table()


def _birth_seconds(batch, table: PatientTable, counts: Counter, keep: np.ndarray):
    n = batch.num_rows
    if table.birth:
        secs, missing, invalid = parse_times(batch.column(table.birth), "")
        counts["invalid birth date"] += int((keep & invalid).sum())
        return secs, ~missing & ~invalid
    if table.age:
        age = parse_values(batch.column(table.age))
        year = parse_values(batch.column(table.age_year))
        ok = np.isfinite(age) & np.isfinite(year) & (age >= 0)
        counts["invalid age or reference year"] += int((keep & ~ok).sum())
        secs = np.zeros(n, np.int64)
        for i in np.flatnonzero(ok):
            born = int(year[i] - age[i])
            secs[i] = _epoch_seconds(born) if 1 <= born <= 9999 else 0
            ok[i] = 1 <= born <= 9999
        return secs, ok
    return None, np.zeros(n, bool)


def _epoch_seconds(year: int) -> int:
    return int((dt.datetime(year, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds())


def quarantine_reasons(counts: dict[str, int]) -> list[str]:
    """'N rows: reason' for every refused-row reason with a non-zero count."""
    return [
        f"{n} rows: {why}"
        for why, n in sorted(counts.items())
        if n and not why.startswith("skipped")
    ]


def safe_name(name: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", name.lower())[:40]
