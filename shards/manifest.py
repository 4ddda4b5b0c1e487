"""The manifest: `manifest.parquet` (one row per sample) plus `manifest.json` (the header).

The header is written last and names the Parquet file's hash, so it is the commit point of a
shard set: without a readable header there is no shard set, only files.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from medfm.io import atomic_write_bytes, get_fs, sha256_bytes

from .errors import SchemaVersionError, ShardFormatError
from .schema import FORMAT_NAME, JSON_COLUMNS, MANIFEST_SCHEMA, SCHEMA_VERSION
from .tarshard import ShardFile

HEADER_NAME = "manifest.json"
ROWS_NAME = "manifest.parquet"


def medfm_version() -> str:
    from medfm import __version__

    return __version__


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["key"])
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"duplicate sample keys in manifest: {dup}")
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_manifest(
    root: str,
    rows: Iterable[dict[str, Any]],
    files: Iterable[ShardFile],
    *,
    datasets: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
    **storage_options: Any,
) -> dict[str, Any]:
    """Write the Parquet rows, then the JSON header that commits them. Returns the header."""
    fs, path = get_fs(root, **storage_options)
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(fs, f"{path}/{ROWS_NAME}", data)
    header = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "medfm_version": medfm_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "num_samples": table.num_rows,
        "manifest": {"path": ROWS_NAME, "sha256": sha256_bytes(data), "bytes": len(data)},
        "files": {
            f.path: {"sha256": f.sha256, "bytes": f.bytes}
            for f in sorted(files, key=lambda f: f.path)
        },
        "datasets": datasets or {},
        "attributes": attributes or {},
    }
    atomic_write_bytes(
        fs, f"{path}/{HEADER_NAME}", json.dumps(header, indent=1, sort_keys=True).encode()
    )
    return header


def check_header(header: Any, where: str) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{where}: not a medfm shard-set header")
    version = header.get("schema_version")
    if not isinstance(version, int):
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
    return header


@dataclass
class Manifest:
    """A shard set's header and rows, opened from a local path or fsspec URL."""

    root: str
    fs: fsspec.AbstractFileSystem
    path: str
    header: dict[str, Any]
    table: pa.Table

    @classmethod
    def open(cls, root: str, *, check_hash: bool = True, **storage_options: Any) -> Manifest:
        fs, path = get_fs(root, **storage_options)
        hpath = f"{path}/{HEADER_NAME}"
        if not fs.exists(hpath):
            raise ShardFormatError(f"{root}: no {HEADER_NAME}; not a finished shard set")
        try:
            header = json.loads(fs.cat_file(hpath))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardFormatError(f"{hpath}: corrupt header ({e})") from e
        check_header(header, hpath)
        rpath = f"{path}/{header['manifest']['path']}"
        try:
            data = fs.cat_file(rpath)
        except FileNotFoundError as e:
            raise ShardFormatError(f"{rpath}: manifest rows missing") from e
        if check_hash and sha256_bytes(data) != header["manifest"]["sha256"]:
            raise ShardFormatError(f"{rpath}: sha256 does not match {HEADER_NAME}")
        try:
            # Single-threaded: with pyarrow 26, a threaded read of an in-memory buffer sometimes
            # aborts the process at interpreter exit ("terminate called without an active
            # exception"). Manifests decode in milliseconds either way.
            table = pq.read_table(pa.BufferReader(data), use_threads=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardFormatError(f"{rpath}: corrupt Parquet ({e})") from e
        missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
        if missing:
            raise ShardFormatError(f"{rpath}: missing columns {sorted(missing)}")
        return cls(root, fs, path, header, table)

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
