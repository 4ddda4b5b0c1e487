"""`medfm shards verify`: re-hash every file and check every manifest row against its payload."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from medfm.io import TMP_MARKER, sha256_bytes, sha256_file

from .codecs import decode
from .errors import ShardError
from .manifest import HEADER_NAME, Manifest
from .tarshard import TAR_DIR, iter_members
from .volume import VOLUME_STORE, array_sha256, open_volume


@dataclass
class VerifyReport:
    root: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files_checked: int = 0
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "ok": self.ok,
            "files_checked": self.files_checked,
            "rows_checked": self.rows_checked,
            "errors": self.errors,
            "warnings": self.warnings,
        }


def verify(root: str, **storage_options: Any) -> VerifyReport:
    """Check header, file hashes, tar member safety and every row's payload hash and shape."""
    report = VerifyReport(root)
    try:
        m = Manifest.open(root, **storage_options)
    except ShardError as e:
        report.errors.append(str(e))
        return report
    _check_files(m, report)
    rows = list(m.rows())
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row)
    for shard, shard_rows in sorted(by_shard.items()):
        check = _check_volume_rows if shard_rows[0]["storage"] == "zarr" else _check_tar_rows
        check(m, shard, shard_rows, report)
    return report


def _check_files(m: Manifest, report: VerifyReport) -> None:
    listed = m.header["files"]
    for rel, rec in sorted(listed.items()):
        path = f"{m.path}/{rel}"
        if not m.fs.exists(path):
            report.errors.append(f"{rel}: listed in {HEADER_NAME} but missing")
            continue
        digest, size = sha256_file(m.fs, path)
        report.files_checked += 1
        if size != rec["bytes"]:
            report.errors.append(f"{rel}: size {size} != recorded {rec['bytes']} (truncated?)")
        elif digest != rec["sha256"]:
            report.errors.append(f"{rel}: sha256 mismatch (corrupt: content changed)")
    for sub in (TAR_DIR, VOLUME_STORE):
        base = f"{m.path}/{sub}"
        if not m.fs.exists(base):
            continue
        for path in m.fs.find(base):
            rel = path[len(m.path) + 1 :]
            if rel in listed or rel == f"{VOLUME_STORE}/zarr.json":
                continue
            kind = "stale temporary file" if TMP_MARKER in rel else "file not in the manifest"
            report.warnings.append(f"{rel}: {kind}")


def _check_tar_rows(
    m: Manifest, shard: str, rows: list[dict[str, Any]], report: VerifyReport
) -> None:
    path = f"{m.path}/{shard}"
    if shard not in m.header["files"]:
        report.errors.append(f"{shard}: referenced by {len(rows)} rows but not in {HEADER_NAME}")
    if not m.fs.exists(path):
        report.errors.append(
            f"{shard}: missing; rows {[r['key'] for r in rows][:5]} point at nothing"
        )
        return
    found: dict[str, tuple[int, bytes]] = {}
    try:
        with m.fs.open(path, "rb") as f:
            for name, offset, data in iter_members(f, shard):
                found[name] = (offset, data)
    except ShardError as e:
        report.errors.append(str(e))
    for row in rows:
        report.rows_checked += 1
        for ext, loc in json.loads(row["members"]).items():
            name = f"{row['key']}.{ext}"
            if name not in found:
                report.errors.append(
                    f"{shard}: row {row['key']} names member {name!r}, "
                    "which the shard does not hold"
                )
                continue
            offset, data = found[name]
            if offset != loc["offset"] or len(data) != loc["size"]:
                report.errors.append(f"{shard}:{name}: offset/size differ from the manifest")
            elif sha256_bytes(data) != loc["sha256"]:
                report.errors.append(f"{shard}:{name}: sha256 mismatch (corrupt payload)")
            elif ext == row["member"]:
                _check_payload(shard, name, ext, data, row, report)


def _check_payload(
    shard: str, name: str, ext: str, data: bytes, row: dict[str, Any], report: VerifyReport
) -> None:
    try:
        arr = decode(ext, data, f"{shard}:{name}")
    except ShardError as e:
        report.errors.append(str(e))
        return
    if list(arr.shape) != list(row["shape"]) or arr.dtype.str != row["dtype"]:
        report.errors.append(
            f"{shard}:{name}: decoded {arr.dtype.str}{list(arr.shape)} but the "
            f"manifest says {row['dtype']}{list(row['shape'])}"
        )


def _check_volume_rows(
    m: Manifest, shard: str, rows: list[dict[str, Any]], report: VerifyReport
) -> None:
    for row in rows:
        report.rows_checked += 1
        try:
            vol = open_volume(m.fs, m.path, row)
            members = json.loads(row["members"])
            arrays = {"image": vol.image, "label": vol.label}
            for name, rec in members.items():
                arr = arrays.get(name)
                if arr is None:
                    report.errors.append(f"{shard}/{name}: array missing")
                    continue
                data = arr[...]
                if data.dtype.str != rec["dtype"]:
                    report.errors.append(f"{shard}/{name}: dtype {data.dtype.str} != manifest")
                elif array_sha256(data) != rec["sha256"]:
                    report.errors.append(
                        f"{shard}/{name}: decoded voxels differ from the "
                        "manifest sha256 (corrupt chunk)"
                    )
        except Exception as e:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            report.errors.append(f"{shard}: unreadable volume ({type(e).__name__}: {e})")
