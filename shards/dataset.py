"""ShardDataset: one shard set as a distributed, shuffled, exactly resumable IterableDataset.

The manifest is the index: filters run on its rows, tar samples are read by byte range from the
offsets it records (one read per sample, no scan), and volumes are sliced from Zarr. The order
of an epoch is a pure function of (seed, epoch), see order.py; planned.py turns that into rank
and worker splits and resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from medfm.io import get_fs, sha256_bytes

from .batchring import DeferredTensor
from .codecs import decode as decode_payload
from .errors import ShardFormatError
from .manifest import Manifest, row_json, row_members
from .order import epoch_order, per_rank, remaining_for_rank
from .patches import PatchSampler
from .planned import PlannedDataset, item_seed
from .sampleio import HandleCache, TarRangeReader, VolumeReader, read_region
from .tarshard import BLOCK, check_member_header
from .transforms import apply_transform

# Load Pillow's format plugins once here, so forked DataLoader workers inherit them instead of
# each importing them before its first image (part of the time to the first batch).
Image.preinit()

DECODES = ("tensor", "numpy")
PIXEL_SCALE = {"|u1": 255.0, "<u2": 65535.0}
ROW_BLOCK, ROW_BLOCKS_CACHED = 512, 8
META_FIELDS = (
    "key", "dataset", "patient_id", "study_id", "series_id", "split", "kind", "modality",
    "shape", "dtype", "spacing", "sampling_rate", "channels", "synthetic", "generator",
    "licence", "shard",
)  # fmt: skip


def _as_set(v: str | Sequence[str] | None) -> set[str] | None:
    return None if v is None else {v} if isinstance(v, str) else set(v)


def select_rows(table: pa.Table, split, kinds, modalities, datasets, labels, synthetic) -> pa.Table:
    """The manifest rows that pass every filter (column filters in Arrow, labels in Python)."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    wanted = {"split": split, "kind": kinds, "modality": modalities, "dataset": datasets}
    for col, values in wanted.items():
        if values is not None:
            values = sorted(_as_set(values))
            mask = pc.and_(mask, pc.is_in(table[col], value_set=pa.array(values, pa.string())))
    if synthetic is not None:
        mask = pc.and_(mask, pc.equal(table["synthetic"], bool(synthetic)))
    table = table.filter(mask)
    by_label = label_filter(labels)
    if by_label is None:
        return table
    keep = [by_label({**r, "labels": row_json(r, "labels")}) for r in table.to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def sample_offsets(table: pa.Table) -> pa.Array:
    """A byte offset of each tar sample, for read order (0 for volumes). Any member's offset
    will do, since the members of different samples never interleave in a tar; taking the first
    in the JSON text keeps this vectorised (it runs at start-up, before the first batch)."""
    found = pc.extract_regex(table["members"], r'"offset"\s*:\s*(?P<offset>\d+)')
    return pc.fill_null(pc.cast(pc.struct_field(found, "offset"), pa.int64()), 0)


def label_filter(labels: dict[str, Any] | Callable[[dict], bool] | None) -> Callable | None:
    """A row predicate from `{name: value or [values]}` (all must match) or a callable."""
    if labels is None or callable(labels):
        return labels

    def match(row: dict[str, Any]) -> bool:
        for name, want in labels.items():
            have = row["labels"].get(name)
            wants = want if isinstance(want, (list, tuple, set)) else [want]
            haves = have if isinstance(have, list) else [have]
            if not any(h in wants for h in haves):
                return False
        return True

    return match


class ScaledPixels(DeferredTensor):
    """8/16-bit pixels as float32 (C, H, W) in [0, 1], converted when written."""

    def __init__(self, raw: np.ndarray):
        self.raw, self.dtype = raw, torch.float32
        self.scale = np.float32(1.0 / PIXEL_SCALE[raw.dtype.str])
        self.shape = (1, *raw.shape) if raw.ndim == 2 else (raw.shape[2], *raw.shape[:2])

    def write(self, out: torch.Tensor) -> None:
        chw = self.raw[None] if self.raw.ndim == 2 else self.raw.transpose(2, 0, 1)
        np.multiply(chw, self.scale, out=out.numpy())  # one pass, no torch op dispatch


def to_tensor(kind: str, arr: np.ndarray) -> torch.Tensor:
    """image2d -> float (C,H,W) scaled to [0,1] for 8/16-bit; signal float (C,T); ehr long."""
    if kind == "ehr":
        kind_int = np.issubdtype(arr.dtype, np.integer)
        return torch.from_numpy(arr.astype(np.int64 if kind_int else np.float32))
    if kind != "image2d":
        t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32, copy=False))
        return t[None] if kind == "volume3d" else t
    if arr.dtype.str in PIXEL_SCALE:
        return ScaledPixels(arr).tensor()
    t = torch.from_numpy(arr.astype(np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def label_tensor(arr: np.ndarray) -> torch.Tensor:
    """Label maps keep a torch-supported integer type (uint16/uint32 widen to int64)."""
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr))


def tar_span(row: dict[str, Any], members: dict[str, Any] | None = None) -> tuple[int, int]:
    """(offset, size) of a tar sample's bytes, from its first member's header to its end."""
    members = members or row_members(row)
    first = min(m["offset"] for m in members.values()) - BLOCK
    return first, max(m["offset"] + m["size"] for m in members.values()) - first


class ShardDataset(PlannedDataset):
    """Samples of one shard set (local path or fsspec URL), filtered through its manifest.

    Yields dicts: "key", "data" (tensor), "meta" (row fields), "label" (labels["class"] when
    present), "label_map" (2D label maps and volume/patch labels) and "index" (sample id in this
    dataset). Distribution, shuffling and exact resume: see planned.py and docs/readers.md.
    """

    def __init__(
        self,
        root_or_url: str,
        *,
        split: str | Sequence[str] | None = None,
        kinds: str | Sequence[str] | None = None,
        modalities: str | Sequence[str] | None = None,
        datasets: str | Sequence[str] | None = None,
        labels: dict[str, Any] | Callable[[dict], bool] | None = None,
        synthetic: bool | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 1000,
        decode: str = "tensor",
        transform: Callable[..., Any] | None = None,
        patches: PatchSampler | None = None,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        max_skips: int = 10,
        check_hash: bool = True,
        name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        version: int | None = None,
    ):
        super().__init__(
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            on_error=on_error,
            max_skips=max_skips,
        )
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, not {decode!r}")
        self.root, self.shuffle, self.buffer_size = root_or_url, shuffle, buffer_size
        self.decode, self.transform, self.patches = decode, transform, patches
        self.check_hash, self.name = check_hash, name or str(root_or_url).rstrip("/")
        # `version`: a version of a set grown by `medfm ingest --append` (default: the newest)
        m = Manifest.open(root_or_url, version=version, **(storage_options or {}))
        if (
            patches is not None
            and get_fs(str(patches.root), **(storage_options or {}))[1] != m.path
        ):
            raise ValueError(f"PatchSampler reads {patches.root}, this dataset {root_or_url}")
        table = select_rows(m.table, split, kinds, modalities, datasets, labels, synthetic)
        if table.num_rows == 0:
            raise ValueError(f"{root_or_url}: no samples match the filters")
        self._build_units(table)
        self._rows = HandleCache(size=ROW_BLOCKS_CACHED)
        self._prepared: dict[int, dict[str, Any]] = {}
        self._tar = TarRangeReader(m.fs, m.path)
        files = frozenset(f for f in m.header["files"] if f.startswith("volumes.zarr/"))
        self._volumes = VolumeReader(m.fs, m.path, files)

    # --- rows and units -------------------------------------------------------------------
    def _build_units(self, table: pa.Table) -> None:
        """Rows are put in shard order (by byte offset inside a tar), so that a worker's reads
        move forward through a file. Units are samples, or (volume, patch) pairs with a
        PatchSampler; a group is the units of one shard."""
        keys = pa.table({"shard": table["shard"], "offset": sample_offsets(table)})
        order = pc.sort_indices(keys, [("shard", "ascending"), ("offset", "ascending")])
        self._table = table.take(order)
        counts = np.ones(len(order), dtype=np.int64)
        if self.patches is not None:  # volumes give patches_per_volume or grid-window units
            counts[:] = [self._units_of(r) for r in self._table.to_pylist()]
        self._unit_row = np.repeat(np.arange(len(counts)), counts)
        first_unit = np.cumsum(counts) - counts
        self._unit_sub = np.arange(len(self._unit_row)) - np.repeat(first_unit, counts)
        shards = self._table["shard"].to_numpy(zero_copy_only=False)
        new_shard = np.flatnonzero(shards[1:] != shards[:-1]) + 1
        self._groups = np.split(np.arange(len(self._unit_row)), first_unit[new_shard])

    def _units_of(self, row: dict[str, Any]) -> int:
        if self.patches is not None and row["storage"] == "zarr":
            return self.patches.units_for(row)
        return 1

    def row(self, i: int) -> dict[str, Any]:
        """Manifest row i (in shard order). Rows stay in Arrow memory: millions of Python dicts
        would be copied into every forked worker. The rows of the units about to load are
        converted together (`prepare`); any other row comes with its block of neighbours."""
        row = self._prepared.get(i)
        if row is not None:
            return row
        block = i // ROW_BLOCK
        rows = self._rows.get(
            str(block), lambda: self._table.slice(block * ROW_BLOCK, ROW_BLOCK).to_pylist()
        )
        return rows[i - block * ROW_BLOCK]

    def prepare(self, units: np.ndarray, epoch: int) -> None:
        # A shuffle buffer keeps stragglers from far back in the shard order, so the rows of a
        # stretch of units are scattered: one take() beats converting a block for each.
        rows = np.unique(self._unit_row[units])
        self._prepared = dict(zip(rows.tolist(), self._table.take(rows).to_pylist(), strict=True))
        if not self._tar.local:  # object stores: these samples' bytes in one concurrent batch
            tars = [r for r in self._prepared.values() if r["storage"] == "tar"]
            self._tar.prefetch([(r["shard"], *tar_span(r)) for r in tars])

    def label_values(self, key: str) -> set[Any]:
        """The distinct labels[key] of the selected rows; a row without it is an error."""
        values = set()
        keys, labels_col = self._table["key"].to_pylist(), self._table["labels"].to_pylist()
        for k, labels in zip(keys, labels_col, strict=True):
            parsed = json.loads(labels)
            if key not in parsed:
                raise ValueError(f"{self.name}: sample {k} has no labels[{key!r}]")
            values.add(parsed[key])
        return values

    # --- PlannedDataset -------------------------------------------------------------------
    def num_units(self) -> int:
        return len(self._unit_row)

    def rank_length(self) -> int:
        return per_rank(self.num_units(), self.world_size, self.drop_last)

    def rank_sequence(self, epoch: int, consumed: int = 0, saved_world: int | None = None):
        order = epoch_order(
            self._groups,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            buffer_size=self.buffer_size,
        )
        world = self.world_size
        return remaining_for_rank(
            order, self.rank, world, self.drop_last, consumed, saved_world or world
        )

    def load(self, unit: int, epoch: int) -> dict[str, Any]:
        row = self.row(int(self._unit_row[unit]))
        # Only random choices need a seed (SeedSequence costs ~50 us, a small PNG ~500 us).
        random = self.transform is not None or (self.patches and row["storage"] == "zarr")
        seed = item_seed(self.seed, epoch, unit) if random else 0
        if row["storage"] == "zarr":
            item = self._load_volume(row, int(self._unit_sub[unit]), seed)
        else:
            item = self._load_tar(row)
        item["index"] = unit
        return apply_transform(self.transform, item, seed)

    # --- decoding -------------------------------------------------------------------------
    def _meta(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = {f: row[f] for f in META_FIELDS}
        meta["labels"] = row_json(row, "labels")
        meta["meta"] = row_json(row, "meta")
        return meta

    def _item(self, row: dict[str, Any], data: Any) -> dict[str, Any]:
        meta = self._meta(row)
        item = {"key": row["key"], "data": data, "meta": meta}
        if "class" in meta["labels"]:  # ints stay ints: collation makes one tensor per batch
            cls = meta["labels"]["class"]
            item["label"] = cls if isinstance(cls, int) else torch.as_tensor(cls)
        return item

    def _load_tar(self, row: dict[str, Any]) -> dict[str, Any]:
        members = row_members(row)
        first, size = tar_span(row, members)
        if size > sum(BLOCK + m["size"] + -m["size"] % BLOCK for m in members.values()):
            raise ShardFormatError(
                f"{row['shard']}:{row['key']}: the sample's members are not consecutive in the "
                "tar; refused"
            )
        span = self._tar.read(row["shard"], first, size)  # one read for the whole sample
        arrays = {}
        for ext, loc in members.items():
            at = loc["offset"] - first
            where = f"{row['shard']}:{row['key']}.{ext}"
            check_member_header(span[at - BLOCK : at], f"{row['key']}.{ext}", loc["size"], where)
            if ext == "json":  # the row already holds the metadata
                continue
            raw = span[at : at + loc["size"]]
            if self.check_hash and sha256_bytes(raw) != loc["sha256"]:
                raise ShardFormatError(f"{where}: sha256 mismatch (corrupt shard)")
            arrays[ext] = decode_payload(ext, raw, where)
        data = arrays.pop(row["member"])
        if self.decode == "tensor":
            defer = self.deferred and self.transform is None and row["kind"] == "image2d"
            if defer and data.dtype.str in PIXEL_SCALE:  # scaled straight into the batch
                data = ScaledPixels(data)
            else:
                data = to_tensor(row["kind"], data)
        item = self._item(row, data)
        for ext, arr in arrays.items():
            name = ext.rsplit(".", 1)[0]
            if name == "label":
                item["label_map"] = label_tensor(arr) if self.decode == "tensor" else arr
            else:
                item.setdefault("extras", {})[name] = arr
        return item

    def _load_volume(self, row: dict[str, Any], sub: int, seed: int) -> dict[str, Any]:
        if self.patches is not None:
            p = self.patches.patch(row, sub, np.random.default_rng(seed))
            image, label = p["image"], p.get("label")
        else:
            vol = self._volumes.open(row)
            image = read_region(vol.image, row["shard"], ...)
            label = read_region(vol.label, row["shard"], ...) if vol.label is not None else None
        tensor = self.decode == "tensor"
        item = self._item(row, to_tensor("volume3d", image) if tensor else image)
        if label is not None:
            item["label_map"] = label_tensor(label)[None] if tensor else label
        if self.patches is not None:
            item["meta"]["patch_start"] = list(p["start"])
            item["meta"]["patch_size"] = list(p["size"])
            item["location"] = torch.tensor(p["start"])
        return item
