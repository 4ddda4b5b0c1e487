"""Source discovery: list files under a root (local or fsspec), pair label maps, read the
labels table, and map relative paths to raw patient/study ids."""

from __future__ import annotations

import csv
import io
import re
from functools import lru_cache
from typing import Any

from medfm.io import get_fs

from .registry import IngestError, ReadContext, SourceFile, SourceItem, known_extensions
from .spec import IdMapping, SourceSpec


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob with `**` (any folders), `*` and `?` (never crossing `/`), as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def list_files(src: SourceSpec) -> tuple[Any, list[SourceFile], int]:
    """(fs, matching files sorted by relative path, number of hidden files ignored)."""
    fs, root = get_fs(src.root, **src.storage_options)
    if not fs.isdir(root):
        raise IngestError(f"source {src.name!r}: root folder does not exist or is not a folder")
    include = [glob_regex(p) for p in src.include]
    exclude = [glob_regex(p) for p in src.exclude]
    files, hidden = [], 0
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            hidden += 1
            continue
        if any(r.match(rel) for r in include) and not any(r.match(rel) for r in exclude):
            files.append(SourceFile(path, rel, int(info.get("size") or 0)))
    return fs, files, hidden


def stem_of(rel: str) -> str:
    """File name without its (longest registered) extension."""
    name = rel.rsplit("/", 1)[-1]
    low = name.lower()
    best = max((e for e in known_extensions() if low.endswith(e)), key=len, default="")
    if best:
        return name[: len(name) - len(best)]
    return name.rsplit(".", 1)[0] if "." in name else name


def label_rel(pattern: str, rel: str) -> str:
    """Where the label map of `rel` lives: the pattern, relative to the image's folder."""
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    target = pattern.format(stem=stem_of(rel))
    parts: list[str] = []
    for p in (folder + target).split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p and p != ".":
            parts.append(p)
    return "/".join(parts)


def pair_labels(src: SourceSpec, files: list[SourceFile], fs: Any) -> tuple[list, dict]:
    """Split files into images and their label maps ({image rel: label SourceFile})."""
    if not src.label:
        return files, {}
    by_rel = {f.rel: f for f in files}
    _, root = get_fs(src.root, **src.storage_options)
    labels: dict[str, SourceFile] = {}
    for f in files:
        lrel = label_rel(src.label, f.rel)
        if lrel == f.rel:
            continue
        if lrel in by_rel:
            labels[f.rel] = by_rel[lrel]
        elif fs.exists(f"{root}/{lrel}"):
            labels[f.rel] = SourceFile(f"{root}/{lrel}", lrel, int(fs.size(f"{root}/{lrel}")))
    used = {lab.rel for lab in labels.values()}
    return [f for f in files if f.rel not in used], labels


@lru_cache(maxsize=16)
def _table(path: str, storage: tuple) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    fs, p = get_fs(path, **dict(storage))
    with fs.open(p, "rb") as f:
        text = f.read().decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise IngestError("labels table is empty")
    return tuple(rows[0]), tuple(tuple(r) for r in rows[1:])


def _number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def table_row(src: SourceSpec, rel: str) -> dict[str, Any]:
    """The labels-table row of an image ({} if the source has no table or no row)."""
    t = src.labels_table
    if t is None:
        return {}
    header, rows = _table(t.path, tuple(sorted(src.storage_options.items())))
    if t.key not in header:
        raise IngestError(f"labels table has no key column {t.key!r}")
    want = stem_of(rel) if t.match == "stem" else rel
    k = header.index(t.key)
    for r in rows:
        if len(r) > k and r[k] == want:
            return {h: _number(v) for h, v in zip(header, r, strict=False) if h != t.key}
    return {}


def sample_labels(src: SourceSpec, row: dict[str, Any]) -> dict[str, Any]:
    cols = src.labels_table.columns if src.labels_table else []
    skip = {"patient_id", "study_id"}
    return {k: v for k, v in row.items() if (k in cols if cols else k not in skip)}


def raw_id(mapping: IdMapping, rel: str, dicom_value: str, row: dict[str, Any], what: str) -> str:
    """The raw (identifying) id under the spec's mapping; pseudonymized right after."""
    how = mapping.source
    if how == "auto":
        how = "dicom" if dicom_value else ("stem" if what == "patient_id" else "none")
    if how == "dicom":
        if not dicom_value:
            raise IngestError(f"{what}: the DICOM attribute is empty")
        return dicom_value
    if how == "stem":
        return stem_of(rel)
    if how == "folder":
        return rel.split("/", 1)[0]
    if how == "regex":
        m = re.search(mapping.regex, rel)
        if not m:
            raise IngestError(f"{what}: regex does not match the relative path")
        return m.group(1)
    if how == "table":
        if what not in row:
            raise IngestError(f"{what}: no labels-table row or column for this file")
        return str(row[what])
    return ""


def identity(
    ctx: ReadContext, item: SourceItem, dicom_patient: str = "", dicom_study: str = ""
) -> tuple[str, str, str, dict[str, Any]]:
    """(raw patient id, patient pseudonym, study pseudonym, class labels) of an item."""
    src = ctx.source
    row = table_row(src, item.rel)
    raw_pid = raw_id(src.patient_id, item.rel, dicom_patient, row, "patient_id")
    raw_study = raw_id(src.study_id, item.rel, dicom_study, row, "study_id")
    study = ctx.uid(raw_study, "study")[:20] if raw_study else ""
    return raw_pid, ctx.patient(raw_pid), study, sample_labels(src, row)
