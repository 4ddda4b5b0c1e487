"""`medfm ingest SPEC --out DEST --append`: add inputs to a finished shard set as a new version.

The new version's rows are the earlier version's rows plus the new samples; its files are the
earlier files (never rewritten) plus the new tars and Zarr groups. What made the earlier
version is kept: the key (checked against the first job's salted hash, so pseudonyms and
splits match), the split and transform settings (a spec that changes them is refused), and the
CT statistics the earlier version recorded (`--refit` fits them again over every input, and
the manifest records that it did). An input is already in the set when a row of the earlier
version came from the same source item (source and recorded path); a new sample whose decoded
content equals an earlier sample's (same sha256) is dropped as a duplicate. EHR sources are
read whole again: patients the set holds keep their samples, new patients are tokenized with
the set's vocabulary (kept as it is, like the MEDS output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from medfm.io import as_url
from medfm.shards import Manifest, ShardFormatError
from medfm.shards.schema import EHR_DIR

from .bookkeeping import JOB_FILE, Bookkeeper, ResumeError
from .privacy import Keyring
from .registry import Reader, SourceItem, create_reader
from .spec import IngestSpec
from .tasks import shown_path

CT_STATS = ("clip_low", "clip_high", "mean", "std", "voxels")  # what the readers apply


@dataclass
class Base:
    """The version an append builds on."""

    manifest: Manifest

    @property
    def version(self) -> int:
        return self.manifest.version

    def present(self) -> set[tuple[str, str]]:
        """(source, recorded path) of every source item the set holds samples of, or that an
        earlier append dropped as a duplicate of one (so it is not converted again)."""
        prov = self.manifest.table.column("provenance").to_pylist()
        datasets = self.manifest.table.column("dataset").to_pylist()
        held = {(ds, json.loads(p).get("path", "")) for ds, p in zip(datasets, prov, strict=True)}
        return held | {tuple(x) for x in self.duplicate_inputs()}

    def duplicate_inputs(self) -> list[list[str]]:
        ingest = self.manifest.header.get("attributes", {}).get("ingest", {})
        return (ingest.get("append") or {}).get("duplicate_inputs", [])

    def new_items(
        self, spec: IngestSpec, keyring: Keyring, items: list[SourceItem], every: set[str]
    ) -> list:
        """The items to convert: those of sources in `every` (EHR buckets, see
        `prepared_sources`), and the others' that the set does not hold yet."""
        have = self.present()
        shown = [(i.source, shown_path(spec, keyring, i.rel)) for i in items]
        return [i for i, s in zip(items, shown, strict=True) if i.source in every or s not in have]

    def prepared(self, source: str) -> dict[str, Any] | None:
        """What an EHR source's append keeps: the set's vocabulary (URL) and its dataset record
        (vocabulary size, what it was fitted on); None for a source the set has no vocabulary of."""
        rel = f"{EHR_DIR}/{source}/vocab.json"
        if rel not in self.manifest.header["files"]:
            return None
        record = self.manifest.header.get("datasets", {}).get(source, {})
        m = self.manifest
        return {"vocab": as_url(m.fs, f"{m.path}/{rel}"), "record": record.get("ehr", {})}

    def ct_stats(self) -> dict[str, dict[str, Any]]:
        """Per dataset of the set, the CT statistics it recorded ({} for one without CT)."""
        out: dict[str, dict[str, Any]] = {}
        for ds, rec in self.manifest.header.get("datasets", {}).items():
            ct = (rec.get("intensity") or {}).get("CT") or {}
            out[ds] = {"ct": {k: ct[k] for k in CT_STATS if k in ct}} if ct else {}
        return out

    def drop_present(self, rows: list[dict[str, Any]]) -> tuple[list, list]:
        """New rows whose content the set already holds go, as duplicates of the old sample;
        returns (kept, dropped pairs). A new row may never take an old row's key: its Zarr
        group would replace the old one's."""
        keys = set(self.manifest.table.column("key").to_pylist())
        old = {
            h: k
            for h, k, kind in zip(
                *(self.manifest.table.column(c).to_pylist() for c in ("sha256", "key", "kind")),
                strict=True,
            )
            if kind != "ehr"
        }
        patients = {  # an EHR patient is one sample: a patient the set holds keeps it
            (d, p): k
            for d, p, k, kind in zip(
                *(
                    self.manifest.table.column(c).to_pylist()
                    for c in ("dataset", "patient_id", "key", "kind")
                ),
                strict=True,
            )  # fmt: skip
            if kind == "ehr"
        }
        kept, dropped = [], []
        for row in rows:
            if row["key"] in keys:
                raise ShardFormatError(f"append: new sample {row['key']} has an existing key")
            held = patients.get((row["dataset"], row["patient_id"]))
            if row["kind"] == "ehr" and held is not None:
                dropped.append({"kept": held, "dropped": row["key"], "sha256": row["sha256"]})
            elif row["kind"] != "ehr" and row["sha256"] in old:
                dropped.append({"kept": old[row["sha256"]], "dropped": row["key"],
                                "sha256": row["sha256"]})  # fmt: skip
            else:
                kept.append(row)
        return kept, dropped

    def merge(
        self,
        rows: list[dict],
        files: dict[str, dict],
        datasets: dict,
        attributes: dict,
        summary: dict[str, Any],
        dropped: list[dict],
    ) -> tuple[list, dict, dict, dict]:
        # fmt: skip
        """The new version's rows, files, dataset records and attributes; `dropped`: the new
        rows dropped as duplicates, whose inputs the version remembers. A new file may not
        share a path with an earlier one unless it is that same file."""
        old_files = self.manifest.header["files"]
        for rel, f in files.items():
            if rel in old_files and (old_files[rel]["sha256"], old_files[rel]["bytes"]) != (
                f["sha256"], f["bytes"]):  # fmt: skip
                raise ShardFormatError(f"append: {rel} would replace a file of version "
                                       f"{self.version}; refused")  # fmt: skip
        merged = {rel: {"path": rel, **rec} for rel, rec in old_files.items()} | files
        # Datasets the new spec no longer names keep their earlier record (their rows stay).
        kept = {k: v for k, v in self.manifest.header.get("datasets", {}).items()
                if k not in datasets}  # fmt: skip
        dups = {tuple(x) for x in self.duplicate_inputs()} | {
            (r["dataset"], json.loads(r["provenance"]).get("path", "")) for r in dropped
        }
        append = {"parent": self.version, **summary, "duplicate_inputs": sorted(map(list, dups))}
        ingest = {**attributes.get("ingest", {}), "append": append}
        return (
            list(self.manifest.rows()) + rows,
            merged,
            {**kept, **datasets},
            {**attributes, "ingest": ingest},
        )


def open_base(dest: str, book: Bookkeeper) -> Base:
    """The newest version of the set at `dest`; a clear ResumeError when there is none."""
    try:
        return Base(Manifest.open(dest))
    except ShardFormatError as e:
        if book.read_json(JOB_FILE) is not None:
            raise ResumeError(
                "cannot append: the first ingest job in the destination has not finished; "
                "finish it with --resume first"
            ) from None
        raise ResumeError(
            f"cannot append: the destination holds no finished shard set ({e}); run without "
            "--append to create one"
        ) from None


COMPARED = {  # attributes of the set an append must keep, and what each one decides
    ("ingest", "split"): "the split (patients' train/val/test)",
    ("ingest", "settings"): "the transform settings (volume, intensity, image2d, signal)",
    ("deidentification",): "the de-identification settings",
}


def check_compatible(base: Base, attributes: dict[str, Any]) -> None:
    """Refuse a spec whose split, transform or de-identification settings differ from the
    ones that made the set: its new samples would not be comparable with the old ones."""
    old = base.manifest.header.get("attributes", {})
    for path, what in COMPARED.items():
        a, b = old, attributes
        for part in path:
            a, b = (a or {}).get(part), (b or {}).get(part)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise ResumeError(
                f"cannot append: the spec changes {what} ({'.'.join(path)}) of the set's "
                f"version {base.version}; keep them as they were, or ingest into a new folder"
            )


def prepared_sources(spec: IngestSpec, items: list[SourceItem], refit: bool) -> set[str]:
    """Sources whose reader has a driver-side pass (EHR: partition and vocabulary). Their items
    are patient buckets over every table file, not files, so each append reads them all again;
    patients the set holds keep their samples (`Base.drop_present`), new patients are tokenized
    with the set's vocabulary. `--refit` cannot refit that vocabulary: the earlier samples are
    tokens of it."""
    out = set()
    for source, fmt in sorted({(i.source, i.format) for i in items}):
        reader = create_reader(fmt, **spec.source(source).options)
        if type(reader).prepare is not Reader.prepare:
            out.add(source)
    if refit and out:
        raise ResumeError(
            f"cannot refit: source {sorted(out)[0]!r} is an EHR source, whose samples are tokens "
            "of the set's vocabulary; append without --refit, or ingest into a new folder"
        )
    return out


def version_items(items: list[SourceItem], sources: set[str], version: int) -> None:
    """EHR buckets of an append get the version in their identity, so their tasks, tars and
    sample keys are new ones (the same bucket of version 1 named the same tar)."""
    for item in items:
        if item.source in sources:
            item.info["part"] = f"v{version}-{item.info['part']}"
