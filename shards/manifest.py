"""The manifest: `manifest.parquet` (one row per sample) plus `manifest.json` (the header).

The header is written last and names the Parquet file's hash, so it is the commit point of a
shard set: without a readable header there is no shard set, only files.

Versions (`medfm ingest --append`): `manifest.json` is always the newest version's header. A
header of version N >= 2 says `"version": N, "parent": N - 1` and names its rows at
`versions/N/manifest.parquet`; before it is committed, the parent's header is kept as
`versions/<N-1>/manifest.json`. Version 1's header has no `version` field (a set that never had
an append is byte for byte what it was before versions existed), and no file of an earlier
version is ever rewritten, so any version opens by number for as long as the set exists.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medfm.io import atomic_write_bytes, get_fs, sha256_bytes

from .codecs import limits
from .errors import SchemaVersionError, ShardFormatError
from .schema import EHR_DIR, FORMAT_NAME, JSON_COLUMNS, MANIFEST_SCHEMA, SCHEMA_VERSION
from .tarshard import TAR_DIR, ShardFile
from .volume import VOLUME_STORE

HEADER_NAME = "manifest.json"
ROWS_NAME = "manifest.parquet"
VERSIONS_DIR = "versions"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
PATH_PART_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
# Where rows may point (RE2 syntax, for Arrow): a tar directly under tars/, named as the tar
# writer names it, or the row's own Zarr group. Nothing else, so no row reaches outside the set.
TAR_SHARD_RE = r"^tars/[A-Za-z0-9_-]{1,80}(\.[a-z0-9_]{1,12})?\.tar$"
KEY_RE2 = r"^[A-Za-z0-9_-]{1,80}$"
NULLABLE = {"sampling_rate"}
ROWS_PER_BATCH = 4096


def medfm_version() -> str:
    from medfm import __version__

    return __version__


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"duplicate sample keys in manifest: {dup}")
    # Batch by batch: for 36,000 ECG rows (35 MB of strings) this took 0.38-0.44 s against
    # 0.6-0.8 s for one from_pylist of them all, a serial step at the end of every ingest job.
    batches = [
        pa.RecordBatch.from_pylist(rows[i : i + ROWS_PER_BATCH], schema=MANIFEST_SCHEMA)
        for i in range(0, len(rows), ROWS_PER_BATCH)
    ]
    return pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA)


def write_manifest(
    root: str,
    rows: Iterable[dict[str, Any]],
    files: Iterable[ShardFile],
    *,
    datasets: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
    version: int = 1,
    **storage_options: Any,
) -> dict[str, Any]:
    """Write the Parquet rows, then the JSON header that commits them. Returns the header.

    `version` >= 2 adds a version on top of the set's newest one, which must be `version - 1`:
    its header is kept under versions/ first, the new rows go to versions/<version>/, and only
    the new `manifest.json` replaces anything (module docstring)."""
    fs, path = get_fs(root, **storage_options)
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    rows_rel = ROWS_NAME if version == 1 else version_rel(version, ROWS_NAME)
    if version > 1:
        _keep_parent_header(fs, path, version - 1)
    atomic_write_bytes(fs, f"{path}/{rows_rel}", data)
    header = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "medfm_version": medfm_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "num_samples": table.num_rows,
        "manifest": {"path": rows_rel, "sha256": sha256_bytes(data), "bytes": len(data)},
        "files": {
            f.path: {"sha256": f.sha256, "bytes": f.bytes}
            for f in sorted(files, key=lambda f: f.path)
        },
        "datasets": datasets or {},
        "attributes": attributes or {},
    }
    if version > 1:
        header.update(version=version, parent=version - 1)
    atomic_write_bytes(
        fs, f"{path}/{HEADER_NAME}", json.dumps(header, indent=1, sort_keys=True).encode()
    )
    return header


def version_rel(version: int, name: str = HEADER_NAME) -> str:
    """Where version `version` keeps its header (once a newer one exists) or its rows."""
    return f"{VERSIONS_DIR}/{version}/{name}"


def header_version(header: dict[str, Any]) -> int:
    """A header's version number: 1 for headers written before versions existed."""
    return header.get("version", 1)


def _keep_parent_header(fs, path: str, parent: int) -> None:
    """Copy the newest header (which must be `parent`) to versions/<parent>/ before a newer
    version replaces manifest.json. A copy left by an interrupted commit must be the same."""
    hpath = f"{path}/{HEADER_NAME}"
    try:
        current = fs.cat_file(hpath)
    except FileNotFoundError as e:
        raise ShardFormatError(f"{hpath}: no version {parent} to add a version to") from e
    newest = header_version(check_header(_parse_header(current, hpath), hpath))
    if newest != parent:
        raise ShardFormatError(
            f"{hpath}: the newest version is {newest}, not {parent}; another job added a "
            "version meanwhile"
        )
    kept = f"{path}/{version_rel(parent)}"
    if fs.exists(kept):
        if fs.cat_file(kept) != current:
            raise ShardFormatError(f"{kept}: differs from version {parent}'s header; refused")
        return
    atomic_write_bytes(fs, kept, current)


def _parse_header(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting
        raise ShardFormatError(f"{where}: corrupt header ({type(e).__name__}: {e})") from e


def check_header(header: Any, where: str) -> dict[str, Any]:
    """Refuse a header that is not a medfm header, is too new, or holds a value of the wrong
    type or a path that leaves the set, before anything is read through it."""
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{where}: not a medfm shard-set header")
    version = header.get("schema_version")
    if not _is_int(version):
        raise ShardFormatError(f"{where}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: schema_version {version} was written by medfm "
            f"{header.get('medfm_version', '?')}; this medfm ({medfm_version()}) reads schema "
            f"versions up to {SCHEMA_VERSION}. Upgrade medfm to read this shard set."
        )
    for field in ("manifest", "files", "num_samples"):
        if field not in header:
            raise ShardFormatError(f"{where}: header lacks {field!r}")
    if not _is_int(header["num_samples"]) or header["num_samples"] < 0:
        raise ShardFormatError(f"{where}: num_samples is not a non-negative integer")
    for field in ("datasets", "attributes"):
        if not isinstance(header.get(field, {}), dict):
            raise ShardFormatError(f"{where}: {field} is not an object")
    number, parent = header.get("version", 1), header.get("parent")
    if not _is_int(number) or number < 1 or (number > 1 and parent != number - 1):
        raise ShardFormatError(
            f"{where}: version {str(number)[:20]!r} (parent {str(parent)[:20]!r}) is not a "
            "positive integer whose parent is the version before it"
        )
    _check_file_record(header["manifest"], "manifest", where)
    check_relpath(header["manifest"].get("path"), "manifest.path", where)
    if not isinstance(header["files"], dict):
        raise ShardFormatError(f"{where}: files is not an object")
    for rel, rec in header["files"].items():
        check_relpath(rel, "files key", where)
        if rel.split("/", 1)[0] not in (TAR_DIR, VOLUME_STORE, EHR_DIR):
            raise ShardFormatError(
                f"{where}: files key {rel[:80]!r} is outside {TAR_DIR}/, {VOLUME_STORE}/ "
                f"and {EHR_DIR}/"
            )
        _check_file_record(rec, f"files[{rel!r}]", where)
    return header


def check_relpath(path: Any, what: str, where: str) -> str:
    """A path relative to the set's root: plain names joined by '/', no '..', '.', empty part,
    leading '/', backslash, scheme or control character, so it can never leave the root."""
    if not isinstance(path, str) or not all(
        PATH_PART_RE.fullmatch(p) and p not in (".", "..") for p in path.split("/")
    ):
        raise ShardFormatError(
            f"{where}: {what} {str(path)[:80]!r} is not a relative path inside the shard set; "
            "refused"
        )
    return path


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_file_record(rec: Any, what: str, where: str) -> None:
    ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("sha256"), str)
        and SHA256_RE.fullmatch(rec["sha256"])
        and _is_int(rec.get("bytes"))
        and rec["bytes"] >= 0
    )
    if not ok:
        raise ShardFormatError(f"{where}: {what} is not {{sha256: hex, bytes: int}}")


def check_rows(table: pa.Table, where: str) -> pa.Table:
    """Column types as the schema says, no nulls, and every row's `shard` inside the set: a tar
    under tars/ or the row's own group volumes.zarr/<key>. Vectorised: runs on every open."""
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ShardFormatError(f"{where}: missing columns {sorted(missing)}")
    try:
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise ShardFormatError(f"{where}: columns of the wrong type ({e})") from e
    for name in MANIFEST_SCHEMA.names:
        if name not in NULLABLE and table[name].null_count:
            raise ShardFormatError(f"{where}: column {name!r} holds nulls")
    storage, shard, key = table["storage"], table["shard"], table["key"]
    is_tar, is_zarr = pc.equal(storage, "tar"), pc.equal(storage, "zarr")
    good = pc.and_(
        pc.match_substring_regex(key, KEY_RE2),
        pc.or_(
            pc.and_(is_tar, pc.match_substring_regex(shard, TAR_SHARD_RE)),
            pc.and_(is_zarr, pc.equal(shard, pc.binary_join_element_wise(
                f"{VOLUME_STORE}/", key, "")))
        ),
    )  # fmt: skip
    bad = pc.invert(good)
    if pc.any(bad).as_py():
        rows = table.filter(bad).select(["key", "storage", "shard"]).slice(0, 3).to_pylist()
        shown = ", ".join(f"{str(r)[:160]}" for r in rows)
        raise ShardFormatError(
            f"{where}: {pc.sum(bad).as_py()} rows have an invalid key, storage or a shard path "
            f"outside the set (tars/<name>.tar or {VOLUME_STORE}/<key>), e.g. {shown}; refused"
        )
    return table


EXT_RE = re.compile(r"[a-z0-9_]{1,12}(\.[a-z0-9_]{1,12})?")
VOLUME_MEMBERS = ("image", "label")


def row_members(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A row's `members` record, decoded and checked (names, types, sizes) before any reader
    seeks or allocates by it; anything else is a ShardFormatError naming the shard and key."""
    where = f"{row['shard']}:{row['key']}"
    members = row_json(row, "members")
    if not isinstance(members, dict) or not members:
        raise ShardFormatError(f"{where}: members is not a non-empty object")
    tar, cap = row["storage"] == "tar", limits().member_bytes
    for ext, rec in members.items():
        if tar:
            ok = (
                EXT_RE.fullmatch(ext)
                and len(f"{row['key']}.{ext}") <= 100
                and isinstance(rec, dict)
                and isinstance(rec.get("sha256"), str)
                and _is_int(rec.get("offset"))
                and _is_int(rec.get("size"))
                and rec["offset"] >= 512
                and 0 <= rec["size"] <= cap
            )
        else:
            ok = (
                ext in VOLUME_MEMBERS
                and isinstance(rec, dict)
                and isinstance(rec.get("sha256"), str)
                and isinstance(rec.get("dtype"), str)
            )
        if not ok:
            raise ShardFormatError(
                f"{where}: members entry {str(ext)[:40]!r} is malformed or over the "
                f"{cap}-byte member limit"
            )
    if tar and row["member"] not in members:
        raise ShardFormatError(f"{where}: primary member {row['member']!r} not in members")
    return members


def row_json(row: dict[str, Any], column: str) -> Any:
    """One JSON column of a row, decoded; bad JSON is a ShardFormatError naming the sample."""
    try:
        return json.loads(row[column])
    except (ValueError, RecursionError) as e:
        raise ShardFormatError(
            f"{row['shard']}:{row['key']}: column {column} is not JSON ({type(e).__name__})"
        ) from e


def read_rows(data: bytes, where: str) -> pa.Table:
    """Parquet bytes to a table; any failure of the decoder is a ShardFormatError."""
    try:
        # pq.read_table over a buffer that wraps Python bytes may release its file reader on one
        # of Arrow's I/O threads, which then needs the GIL; at interpreter exit that thread is
        # torn down mid-destructor and the process aborts ("terminate called without an active
        # exception", about 1 `medfm shards verify` in 40 on a loaded box). So: a copy Arrow
        # owns (no GIL to free it) and ParquetFile's synchronous reader, closed here.
        sink = pa.BufferOutputStream()
        sink.write(data)
        with pq.ParquetFile(pa.BufferReader(sink.getvalue())) as f:
            table = f.read(use_threads=False)
        table.column_names  # noqa: B018 - decodes every name: a bad one fails here, not later
        return table
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError) as e:
        raise ShardFormatError(f"{where}: corrupt Parquet ({type(e).__name__}: {e})") from e


@dataclass
class Manifest:
    """A shard set's header and rows, opened from a local path or fsspec URL."""

    root: str
    fs: fsspec.AbstractFileSystem
    path: str
    header: dict[str, Any]
    table: pa.Table
    latest: int = 1  # the set's newest version (this one is `version`)

    @classmethod
    def open(
        cls, root: str, *, version: int | None = None, check_hash: bool = True,
        **storage_options: Any,
    ) -> Manifest:  # fmt: skip
        """The newest version, or version `version` (1 = the set as first ingested)."""
        fs, path = get_fs(root, **storage_options)
        hpath = f"{path}/{HEADER_NAME}"
        if not fs.exists(hpath):
            raise ShardFormatError(f"{root}: no {HEADER_NAME}; not a finished shard set")
        header = check_header(_parse_header(fs.cat_file(hpath), hpath), hpath)
        latest = header_version(header)
        if version is not None and version != latest:
            if not _is_int(version) or not 1 <= version < latest:
                raise ShardFormatError(
                    f"{root}: no version {version!r}; this set holds versions 1 to {latest}"
                )
            hpath = f"{path}/{version_rel(version)}"
            try:
                data = fs.cat_file(hpath)
            except FileNotFoundError as e:
                raise ShardFormatError(f"{hpath}: version {version}'s header is missing") from e
            header = check_header(_parse_header(data, hpath), hpath)
            if header_version(header) != version:
                raise ShardFormatError(f"{hpath}: holds version {header_version(header)}")
        rpath = f"{path}/{header['manifest']['path']}"
        try:
            data = fs.cat_file(rpath)
        except FileNotFoundError as e:
            raise ShardFormatError(f"{rpath}: manifest rows missing") from e
        if check_hash and sha256_bytes(data) != header["manifest"]["sha256"]:
            raise ShardFormatError(f"{rpath}: sha256 does not match {HEADER_NAME}")
        table = check_rows(read_rows(data, rpath), rpath)
        if table.num_rows != header["num_samples"]:
            raise ShardFormatError(
                f"{hpath}: num_samples {header['num_samples']} but {ROWS_NAME} holds "
                f"{table.num_rows} rows"
            )
        return cls(root, fs, path, header, table, latest)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, decode_json: bool = False) -> Iterator[dict[str, Any]]:
        for row in self.table.to_pylist():
            if decode_json:
                for col in JSON_COLUMNS:
                    row[col] = json.loads(row[col])
            yield row

    def to_pandas(self):
        return self.table.to_pandas()

    @property
    def schema_version(self) -> int:
        return self.header["schema_version"]

    @property
    def version(self) -> int:
        return header_version(self.header)
