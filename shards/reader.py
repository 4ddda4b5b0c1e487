"""Random access to samples of a shard set by manifest row (streaming loaders build on this)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from medfm.io import read_range, sha256_bytes

from .codecs import decode
from .errors import ShardFormatError
from .manifest import Manifest, row_json, row_members
from .sampleio import read_region
from .schema import Sample
from .tarshard import BLOCK, check_member_header
from .volume import open_volume


class ShardSet:
    """An opened shard set: its manifest plus sample decoding. `version`: a version number of
    a set grown by `medfm ingest --append` (default: the newest)."""

    def __init__(self, root: str, *, version: int | None = None, **storage_options: Any):
        self.manifest = Manifest.open(root, version=version, **storage_options)
        self.fs, self.path = self.manifest.fs, self.manifest.path

    def __len__(self) -> int:
        return len(self.manifest)

    def rows(self) -> Iterator[dict[str, Any]]:
        return self.manifest.rows()

    def read_member(self, row: dict[str, Any], ext: str, check: bool = True) -> bytes:
        """The raw bytes of one tar member, by byte range (no scan of the shard), with the tar
        header before them: a regular file of the recorded name and size, never a link."""
        members = row_members(row)
        if ext not in members:
            raise ShardFormatError(f"{row['shard']}:{row['key']}: no member {ext!r}")
        loc = members[ext]
        name = f"{row['key']}.{ext}"
        where = f"{row['shard']}:{name}"
        start = loc["offset"] - BLOCK
        try:
            span = read_range(self.fs, f"{self.path}/{row['shard']}", start, BLOCK + loc["size"])
        except FileNotFoundError as e:
            raise ShardFormatError(f"{where}: shard file is missing") from e
        except OSError as e:
            raise ShardFormatError(f"{where}: cannot read ({e})") from e
        if len(span) != BLOCK + loc["size"]:
            raise ShardFormatError(f"{where}: shard is truncated")
        check_member_header(span[:BLOCK], name, loc["size"], where)
        data = span[BLOCK:]
        if check and sha256_bytes(data) != loc["sha256"]:
            raise ShardFormatError(f"{where}: sha256 mismatch (corrupt shard)")
        return data

    def read_sample(self, row: dict[str, Any], check: bool = True) -> Sample:
        """Decode a full sample (volumes are read whole; use PatchSampler for patches)."""
        members = row_members(row)
        meta = row_json(row, "meta")
        common = dict(
            key=row["key"],
            kind=row["kind"],
            modality=row["modality"],
            dataset=row["dataset"],
            patient_id=row["patient_id"],
            split=row["split"],
            study_id=row["study_id"],
            series_id=row["series_id"],
            labels=row_json(row, "labels"),
            sampling_rate=row["sampling_rate"],
            channels=list(row["channels"] or []),
            synthetic=row["synthetic"],
            generator=row["generator"],
            licence=row["licence"],
            provenance=row_json(row, "provenance"),
            meta=meta,
        )
        if row["storage"] == "zarr":
            vol = open_volume(self.fs, self.path, row)
            label = vol.label
            return Sample(
                data=read_region(vol.image, row["shard"], ...),
                geometry=vol.geometry,
                label_map=read_region(label, row["shard"], ...) if label is not None else None,
                **common,
            )
        data = self._decode(row, row["member"], check)
        label_map, extras = None, {}
        for ext in members:
            if ext.startswith("label."):
                label_map = self._decode(row, ext, check)
            elif ext.endswith(".npy"):
                extras[ext[:-4]] = self._decode(row, ext, check)
        spacing = tuple(row["spacing"]) if row["spacing"] else None
        return Sample(data=data, label_map=label_map, extras=extras, spacing=spacing, **common)

    def _decode(self, row: dict[str, Any], ext: str, check: bool):
        return decode(ext, self.read_member(row, ext, check), f"{row['shard']}:{row['key']}.{ext}")
