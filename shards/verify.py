"""`medfm shards verify`: re-hash every file and check every manifest row against its payload."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from medfm.io import TMP_MARKER, MissingExtraError, sha256_bytes, sha256_file

from .codecs import decode
from .errors import ShardError, ShardFormatError
from .manifest import HEADER_NAME, Manifest, row_members
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


def verify(root: str, *, version: int | None = None, **storage_options: Any) -> VerifyReport:
    """Check header, file hashes, tar member safety and every row's payload hash and shape, of
    the newest version or of version `version`. Every problem becomes a line of the report;
    nothing an input holds makes verify raise."""
    report = VerifyReport(root)
    try:
        m = Manifest.open(root, version=version, **storage_options)
    except ShardError as e:
        report.errors.append(str(e))
        return report
    except MissingExtraError:  # nothing wrong with the set: the CLI says what to install
        raise
    except Exception as e:  # noqa: BLE001 - a reader bug must still end in a report
        report.errors.append(f"{root}: cannot open ({type(e).__name__}: {e})")
        return report
    stage = "files"
    try:
        _check_files(m, report)
        by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in m.rows():
            by_shard[row["shard"]].append(row)
        for shard, shard_rows in sorted(by_shard.items()):
            stage = shard
            check = _check_volume_rows if shard_rows[0]["storage"] == "zarr" else _check_tar_rows
            check(m, shard, shard_rows, report)
    except Exception as e:  # noqa: BLE001 - a checker bug must still end in a report, not a trace
        report.errors.append(f"{stage}: verify could not finish ({type(e).__name__}: {e})")
    return report


def _check_files(m: Manifest, report: VerifyReport) -> None:
    listed = m.header["files"]
    expected = set(listed)
    if m.version < m.latest:  # an earlier version: the newer versions' files are expected too
        newest = json.loads(m.fs.cat_file(f"{m.path}/{HEADER_NAME}"))
        expected |= set(newest.get("files", {}))
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
            if rel in expected or rel == f"{VOLUME_STORE}/zarr.json":
                continue
            kind = "stale temporary file" if TMP_MARKER in rel else "file not in the manifest"
            report.warnings.append(f"{rel}: {kind}")


@dataclass
class _Member:
    """A tar member as the scan saw it; data is kept only for the payloads that get decoded."""

    index: int
    offset: int
    size: int
    sha256: str
    data: bytes | None


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
    members = {}
    for row in rows:
        report.rows_checked += 1
        try:
            members[row["key"]] = row_members(row)
        except ShardFormatError as e:
            report.errors.append(str(e))
    primaries = {f"{r['key']}.{r['member']}" for r in rows}
    found = _scan_tar(m, path, shard, primaries, report)
    claimed: set[str] = set()
    for row in rows:
        if row["key"] in members:
            claimed |= _check_tar_row(shard, row, members[row["key"]], found, report)
    for name in sorted(set(found) - claimed)[:20]:
        report.warnings.append(f"{shard}: member {name!r} belongs to no manifest row")


def _scan_tar(
    m: Manifest, path: str, shard: str, keep: set[str], report: VerifyReport
) -> dict[str, _Member]:
    found: dict[str, _Member] = {}
    try:
        with m.fs.open(path, "rb") as f:
            for i, (name, offset, data) in enumerate(iter_members(f, shard)):
                if name in found:
                    report.errors.append(f"{shard}: member {name!r} appears twice")
                    continue
                kept = data if name in keep else None
                found[name] = _Member(i, offset, len(data), sha256_bytes(data), kept)
    except ShardError as e:
        report.errors.append(str(e))
    return found


def _check_tar_row(
    shard: str,
    row: dict[str, Any],
    members: dict[str, dict[str, Any]],
    found: dict[str, _Member],
    report: VerifyReport,
) -> set[str]:
    """Check one row's members against the scan; returns the member names it accounts for."""
    key = row["key"]
    if row["sha256"] != members[row["member"]]["sha256"]:
        report.errors.append(f"{shard}: row {key}: sha256 differs from its primary member's")
    names = {f"{key}.{ext}": loc for ext, loc in members.items()}
    for name, loc in names.items():
        have = found.get(name)
        if have is None:
            report.errors.append(
                f"{shard}: row {key} names member {name!r}, which the shard does not hold"
            )
        elif have.offset != loc["offset"] or have.size != loc["size"]:
            report.errors.append(f"{shard}:{name}: offset/size differ from the manifest")
        elif have.sha256 != loc["sha256"]:
            report.errors.append(f"{shard}:{name}: sha256 mismatch (corrupt payload)")
        elif have.data is not None:
            _check_payload(shard, name, name.split(".", 1)[1], have.data, row, report)
    positions = sorted(found[n].index for n in names if n in found)
    if positions and positions != list(range(positions[0], positions[0] + len(positions))):
        report.errors.append(
            f"{shard}: the members of sample {key} are not consecutive in the tar "
            "(WebDataset readers would split it into several samples)"
        )
    return set(names)


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
            members = row_members(row)
            vol = open_volume(m.fs, m.path, row)
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
