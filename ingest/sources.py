"""Source discovery: list files under a root (local or fsspec), pair label maps, read the
labels table, and map relative paths to raw patient/study ids."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from medfm.io import get_fs, is_local

from .registry import (
    IngestError,
    Quarantine,
    ReadContext,
    SourceFile,
    SourceItem,
    known_extensions,
)
from .spec import DICOMWEB_SCHEME, IdMapping, IngestSpec, SourceSpec


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


def list_files(src: SourceSpec) -> tuple[Any, list[SourceFile], list[Quarantine]]:
    """(fs, matching files sorted by relative path, quarantine records for what discovery did
    not follow: directory symlinks and, with `follow_symlinks`, loops). Dot-files are ignored."""
    if src.root.startswith(DICOMWEB_SCHEME):
        raise IngestError(f"source {src.name!r}: a DICOMweb source has no folder to list until "
                          "the job fetched it (--dry-run does not query a PACS)")  # fmt: skip
    fs, root = get_fs(src.root, **src.storage_options)
    if not fs.isdir(root):
        raise IngestError(f"source {src.name!r}: root folder does not exist or is not a folder")
    include = [glob_regex(p) for p in src.include]
    exclude = [glob_regex(p) for p in src.exclude]
    if is_local(fs):
        found, skipped = _walk_local(root, src.follow_symlinks)
    else:  # object stores have no symlinks
        found, skipped = (
            {p: int(i.get("size") or 0) for p, i in fs.find(root, detail=True).items()},
            {},
        )
    files, notes = [], []
    for path in sorted(found.keys() | skipped.keys()):
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if path in skipped:
            notes.append(Quarantine(rel, skipped[path], src.name, "UnsupportedInput"))
        elif any(r.match(rel) for r in include) and not any(r.match(rel) for r in exclude):
            files.append(SourceFile(path, rel, found[path]))
    return fs, files, notes


def _walk_local(root: str, follow: bool) -> tuple[dict[str, int], dict[str, str]]:
    """({file path: size}, {directory symlink path: why it was not followed}).

    fsspec lists a symlink to a folder as a file, whose reading then fails; following them
    blindly never ends on a loop. Without `follow`, directory symlinks are reported and left;
    with it, each folder is entered once (by device and inode), so loops and second links to a
    folder already listed are reported instead of walked again."""
    files: dict[str, int] = {}
    skipped: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()
    stack: list[str] = []

    def enter(path: str) -> bool:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            return False
        seen.add((st.st_dev, st.st_ino))
        stack.append(path)
        return True

    enter(root)
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # unreadable folder: reported, the rest is still listed
            skipped[folder] = f"folder cannot be listed ({type(e).__name__})"
            continue
        links = []
        for e in entries:  # real folders first: a link never hides the folder it points to
            if e.name.startswith("."):  # dot-files and dot-folders are never inputs
                continue
            if e.is_dir(follow_symlinks=False):
                enter(e.path)
            elif e.is_symlink() and e.is_dir():
                links.append(e.path)
            else:  # files, and links to files (a dangling one fails when it is read)
                files[e.path] = e.stat().st_size if e.is_file() else 0
        for path in links:
            if not follow:
                skipped[path] = NOT_FOLLOWED
            elif not enter(path):
                skipped[path] = LOOP
    return files, skipped


NOT_FOLLOWED = "directory symlink not followed (set follow_symlinks: true to list its files)"
LOOP = "directory symlink loop (or a second link to a folder already listed): not followed"


def stem_of(rel: str) -> str:
    """File name without its (longest registered) extension."""
    name = rel.rsplit("/", 1)[-1]
    low = name.lower()
    best = max((e for e in known_extensions() if low.endswith(e)), key=len, default="")
    if best:
        return name[: len(name) - len(best)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _normalise(path: str, clamp: bool = False) -> str | None:
    """A relative path with `.` and `..` resolved; one that leaves the root is None, or with
    `clamp` stays at the root."""
    parts: list[str] = []
    for p in path.replace("\\", "/").split("/"):
        if p == ".." and not parts and not clamp:
            return None
        if p == "..":
            parts = parts[:-1]
        elif p and p != ".":
            parts.append(p)
    return "/".join(parts)


def label_rel(pattern: str, rel: str) -> str:
    """Where the label map of `rel` lives: the pattern, relative to the image's folder."""
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    return _normalise(folder + pattern.format(stem=stem_of(rel)), clamp=True) or ""


@dataclass
class LabelPairs:
    """Which label map goes with which image: `label` is keyed by image file, or by a folder
    holding one DICOM series; `where` says where each pair was named (for reasons, PHI-free);
    `case` names the case of an nnU-Net channel file (its channels share one patient id);
    `quarantine` holds the named label maps that were not found."""

    label: dict[str, SourceFile] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    case: dict[str, str] = field(default_factory=dict)
    quarantine: list[Quarantine] = field(default_factory=list)


def pair_labels(
    src: SourceSpec, files: list[SourceFile], fs: Any
) -> tuple[list[SourceFile], LabelPairs]:
    """Split files into images and their label maps, from the `label` pattern or the
    `label_pairs` file. Label maps (and the pairs file) are never images themselves."""
    pairs = LabelPairs()
    if not src.label and not src.label_pairs:
        return files, pairs
    by_rel = {f.rel: f for f in files}
    _, root = get_fs(src.root, **src.storage_options)
    if src.label:
        rows = [(f.rel, label_rel(src.label, f.rel), "the label pattern", "") for f in files]
        rows = [r for r in rows if r[1] != r[0]]
    else:
        rows = pairs_rows(src, fs, root, files)
    not_images = {_normalise(src.label_pairs)} if src.label_pairs else set()
    for image, lrel, where, case in rows:
        if case:
            pairs.case[image] = case
        not_images.add(lrel)
        if lrel in by_rel:
            pairs.label[image] = by_rel[lrel]
        elif fs.exists(f"{root}/{lrel}") and not fs.isdir(f"{root}/{lrel}"):
            pairs.label[image] = SourceFile(f"{root}/{lrel}", lrel, int(fs.size(f"{root}/{lrel}")))
        elif src.label_pairs:  # a pattern's label is optional; a named one is not
            pairs.quarantine.append(
                Quarantine(lrel, f"label map not found (named in {where})", src.name,
                           "UnreadableInput")
            )  # fmt: skip
            continue
        else:
            continue
        pairs.where[image] = where
    if src.label_pairs and not src.label_pairs.lower().endswith(".csv"):
        # Decathlon and nnU-Net datasets keep every label map under labelsTr/
        not_images |= {f.rel for f in files if f.rel.startswith(LABELS_TR)}
        named = {lab.rel for lab in pairs.label.values()}
        pairs.quarantine += [
            Quarantine(f.rel, "label map not used: no image is paired with it by dataset.json",
                       src.name, "IngestError")
            for f in files if f.rel.startswith(LABELS_TR) and f.rel not in named
        ]  # fmt: skip
    return [f for f in files if f.rel not in not_images], pairs


LABELS_TR = "labelsTr/"
NNUNET_CHANNEL = re.compile(r"^imagesTr/(.+)_(\d{4})$")


def pairs_rows(
    src: SourceSpec, fs: Any, root: str, files: list[SourceFile]
) -> list[tuple[str, str, str, str]]:
    """(image rel, label rel, where it was named, nnU-Net case) from the source's
    `label_pairs`: a CSV with `image,label` columns, a Medical Segmentation Decathlon
    dataset.json (`training: [{image, label}]`) or an nnU-Net v2 dataset.json (imagesTr/
    CASE_0000<ending> with labelsTr/CASE<ending>). Paths are relative to the source root."""
    name = _normalise(src.label_pairs)
    what = f"source {src.name!r}: label_pairs {src.label_pairs!r}"
    try:
        with fs.open(f"{root}/{name}", "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{what}: cannot read it ({type(e).__name__})") from None
    if name.lower().endswith(".csv"):
        raw = _csv_pairs(text, what, name.rsplit("/", 1)[-1])
    else:
        raw = _json_pairs(text, what, files)
    rows = []
    for image, label, where, case in raw:
        i, lab = _normalise(image.strip()), _normalise(label.strip())
        if not i or not lab or image.strip().startswith("/") or label.strip().startswith("/"):
            raise IngestError(f"{what}: {where} names a path outside the source root")
        rows.append((i, lab, where, case))
    return rows


def _csv_pairs(text: str, what: str, name: str) -> list[tuple[str, str, str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
        raise IngestError(f"{what}: needs the columns image,label")
    return [
        (r["image"] or "", r["label"] or "", f"{name} row {n}", "")
        for n, r in enumerate(reader, start=2)
        if (r["image"] or "").strip() or (r["label"] or "").strip()
    ]


def _json_pairs(text: str, what: str, files: list[SourceFile]) -> list[tuple[str, str, str, str]]:
    try:
        meta = json.loads(text)
    except ValueError:
        raise IngestError(f"{what}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise IngestError(f"{what}: not a dataset.json object")
    if isinstance(meta.get("training"), list):  # Medical Segmentation Decathlon
        out = []
        for n, e in enumerate(meta["training"]):
            if not (isinstance(e, dict) and isinstance(e.get("image"), str)
                    and isinstance(e.get("label"), str)):  # fmt: skip
                raise IngestError(f"{what}: training[{n}] needs image and label paths")
            out.append((e["image"], e["label"], f"dataset.json training[{n}]", ""))
        return out
    if isinstance(meta.get("file_ending"), str):  # nnU-Net v2 raw dataset
        ending = meta["file_ending"]
        out = []
        for f in files:
            m = f.rel.endswith(ending) and NNUNET_CHANNEL.match(f.rel[: -len(ending)])
            if m:
                case = m.group(1)
                # the case name stays out of reasons: it may be a patient's name or id
                out.append((f.rel, f"{LABELS_TR}{case}{ending}", "the nnU-Net layout", case))
        return out
    raise IngestError(
        f"{what}: neither a Decathlon dataset.json (training list) nor an nnU-Net v2 one "
        "(file_ending)"
    )


def attach_labels(pairs: LabelPairs, items: list[SourceItem], source: str) -> list[Quarantine]:
    """Give each item its label map: by its file, or by the folder holding its (DICOM) files.
    Every label map that no item takes is quarantined with the reason, never dropped."""
    used: set[str] = set()
    sliced: set[str] = set()  # keys that named one file of a multi-file item
    by_folder: dict[str, list[SourceItem]] = {}
    for it in items:
        if len(it.files) == 1 and it.files[0].rel in pairs.case:
            it.info["case"] = pairs.case[it.files[0].rel]
        if len(it.files) == 1 and it.files[0].rel in pairs.label:
            _attach(it, it.files[0].rel, pairs, used)
            continue
        sliced |= {f.rel for f in it.files if f.rel in pairs.label}
        folders = {a for f in it.files for a in _ancestors(f.rel) if a in pairs.label}
        for a in folders:
            by_folder.setdefault(a, []).append(it)
    out = []
    for folder, its in sorted(by_folder.items()):
        if len(its) == 1 and its[0].label is None:
            _attach(its[0], folder, pairs, used)
            continue
        why = (f"its folder holds {len(its)} series or images; name one series folder per label map"
               if len(its) > 1 else "its image already has a label map")  # fmt: skip
        out.append(_unused(pairs, folder, source, why))
    for key in sorted(pairs.label.keys() - used - by_folder.keys()):
        why = ("its image is one file of a DICOM series: name the series folder in label_pairs"
               if key in sliced else "its image was not found among the converted inputs "
               "(missing, excluded, or quarantined)")  # fmt: skip
        out.append(_unused(pairs, key, source, why))
    return out


def _attach(item: SourceItem, key: str, pairs: LabelPairs, used: set[str]) -> None:
    item.label = pairs.label[key]
    used.add(key)


def _unused(pairs: LabelPairs, key: str, source: str, why: str) -> Quarantine:
    return Quarantine(pairs.label[key].rel, f"label map not used ({pairs.where[key]}): {why}",
                      source, "IngestError")  # fmt: skip


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


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


def raw_id(
    mapping: IdMapping, rel: str, dicom_value: str, row: dict[str, Any], what: str, case: str = ""
) -> str:
    """The raw (identifying) id under the spec's mapping; pseudonymized right after. `case`
    replaces the stem for channel files of one case (nnU-Net's CASE_0000, CASE_0001)."""
    how = mapping.source
    if how == "auto":
        how = "dicom" if dicom_value else ("stem" if what == "patient_id" else "none")
    if how == "dicom":
        if not dicom_value:
            raise IngestError(f"{what}: the DICOM attribute is empty")
        return dicom_value
    if how == "stem":
        return case or stem_of(rel)
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
    case = str(item.info.get("case", ""))
    raw_pid = raw_id(src.patient_id, item.rel, dicom_patient, row, "patient_id", case)
    raw_study = raw_id(src.study_id, item.rel, dicom_study, row, "study_id", case)
    study = ctx.uid(raw_study, "study")[:20] if raw_study else ""
    return raw_pid, ctx.patient(raw_pid), study, sample_labels(src, row)


def check_destination(spec: IngestSpec, dest: str) -> None:
    """Refuse an output folder the job cannot use: a regular file, or one inside a source
    root (discovery would list the job's own outputs as inputs on the next run or resume)."""
    fs, path = get_fs(dest)
    if fs.isfile(path):
        raise IngestError(f"--out {dest}: is a file; give a folder (new or a shard set's)")
    for src in spec.sources:
        if src.root.startswith(DICOMWEB_SCHEME):  # fetched under the destination's _ingest/
            continue
        sfs, root = get_fs(src.root, **src.storage_options)
        if fs.protocol != sfs.protocol:
            continue
        if is_local(fs):
            path, root = os.path.realpath(path), os.path.realpath(root)
        if path == root or path.startswith(root.rstrip("/") + "/"):
            raise IngestError(
                f"--out {dest}: lies inside the root of source {src.name!r}, so the job would "
                "ingest its own outputs; write the shard set outside every source root"
            )
