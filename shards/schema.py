"""The sample schema: what one sample is, and how it becomes a manifest row.

docs/shard-format.md is the normative description; this module is its executable form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
FORMAT_NAME = "medfm-shards"
KINDS = ("image2d", "volume3d", "signal", "ehr")
SPLITS = ("train", "val", "test")
EHR_DIR = "ehr"  # EHR vocabularies and MEDS datasets: ehr/<dataset>/vocab.json, .../meds/

# EHR samples (kind "ehr"): `data` holds int32 ids into the dataset's vocabulary
# (EHR_DIR/<dataset>/vocab.json; 0 is [PAD]), and these per-token arrays ride in `extras`, each
# as long as `data`. Ingest writes them and every consumer (the preprocessing contract of
# pretraining and fine-tuning) reads them by these names.
EHR_TIME = "time"  # float32 hours since the sequence's first event
EHR_AGE = "age"  # float32 years at the token's event; -1 where no birth is known; capped at 90
EHR_DELTA = "delta"  # float32 hours since the previous token's event
EHR_TYPE = "type"  # uint8: 0 special, 1 code, 2 value bin, 3 interval, 4 static
EHR_EXTRAS = (EHR_TIME, EHR_AGE, EHR_DELTA, EHR_TYPE)


def ehr_vocab_size(header: dict[str, Any]) -> int:
    """Token ids of a shard set's EHR samples lie in [0, this): the largest vocabulary among
    its datasets (the manifest's `datasets.<name>.ehr.vocab_size`); 0 when none records one."""
    sizes = [
        int(rec["ehr"]["vocab_size"])
        for rec in (header.get("datasets") or {}).values()
        if isinstance(rec, dict) and isinstance(rec.get("ehr"), dict) and "vocab_size" in rec["ehr"]
    ]
    return max(sizes, default=0)


# Keys become tar member prefixes and Zarr group names: no dots (WebDataset splits the key from
# the extension at the first dot), no slashes, nothing a shell or filesystem would reinterpret.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
COMPONENT_RE = re.compile(r"^[a-z0-9_]{1,12}$")
MEMBER_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}(\.[a-z0-9_]{1,12}){1,2}$")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use 1-80 characters of [A-Za-z0-9_-]")
    return key


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of a volume in the LPS world frame (DICOM/ITK convention), in mm.

    Array axes are (i, j, k) = ITK index order (x fastest in ITK terms). `direction` is the 3x3
    matrix, row-major, whose column c is the world unit vector of array axis c; `origin` is the
    world position of the centre of voxel (0, 0, 0).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def affine(self) -> np.ndarray:
        """4x4 voxel-index -> LPS-mm matrix."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction, float).reshape(3, 3) * np.asarray(self.spacing)
        out[:3, 3] = self.origin
        return out

    @classmethod
    def from_affine(cls, affine_lps: np.ndarray) -> Geometry:
        m = np.asarray(affine_lps, float)[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = m / spacing
        return cls(
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in np.asarray(affine_lps, float)[:3, 3]),
            direction=tuple(float(d) for d in direction.reshape(-1)),
        )

    @classmethod
    def from_nifti_affine(cls, affine_ras: np.ndarray) -> Geometry:
        """NIfTI affines map to RAS; flip x and y to get LPS."""
        return cls.from_affine(np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float))

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


@dataclass
class Sample:
    """One sample as it goes into (and comes out of) a shard set.

    `data` layout by kind: image2d (H, W) or (H, W, C); volume3d (I, J, K); signal (C, T);
    ehr a 1-D token array. `extras` are further named arrays stored beside the payload
    (label maps of 2D images, EHR times, signal annotations, ...).
    """

    key: str
    kind: str
    modality: str
    dataset: str
    patient_id: str
    split: str
    data: np.ndarray
    study_id: str = ""
    series_id: str = ""
    label_map: np.ndarray | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    geometry: Geometry | None = None
    spacing: tuple[float, ...] | None = None
    sampling_rate: float | None = None
    channels: list[str] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic: bool = False
    generator: str = ""
    licence: str = ""
    provenance: dict[str, Any] | JSONText = field(default_factory=dict)  # see JSONText
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check_key(self.key)
        if self.kind not in KINDS:
            raise ValueError(f"sample {self.key}: kind {self.kind!r} is not one of {KINDS}")
        if not self.split:
            raise ValueError(f"sample {self.key}: split is empty")
        if not self.patient_id or not self.dataset:
            raise ValueError(f"sample {self.key}: dataset and patient_id are required")
        want = {"image2d": (2, 3), "volume3d": (3,), "signal": (2,), "ehr": (1,)}[self.kind]
        if self.data.ndim not in want:
            raise ValueError(
                f"sample {self.key}: {self.kind} data must have ndim in {want}, "
                f"got shape {self.data.shape}"
            )
        if self.data.dtype.hasobject:
            raise ValueError(f"sample {self.key}: object arrays are not storable (no pickle)")
        if self.kind == "volume3d" and self.geometry is None:
            raise ValueError(f"sample {self.key}: volume3d samples need a Geometry")
        if self.kind == "signal" and not (self.sampling_rate and self.sampling_rate > 0):
            raise ValueError(f"sample {self.key}: signal samples need a positive sampling_rate")
        if self.label_map is not None and self.label_map.shape[:2] != self.data.shape[:2]:
            raise ValueError(
                f"sample {self.key}: label map shape {self.label_map.shape} does "
                f"not match data shape {self.data.shape}"
            )
        for name in self.extras:
            if not COMPONENT_RE.match(name) or name in ("json", "label", "npy", "png"):
                raise ValueError(f"sample {self.key}: invalid extra component name {name!r}")
        if self.kind == "ehr":
            for name in EHR_EXTRAS:
                got = self.extras.get(name)
                if got is not None and np.shape(got) != self.data.shape:
                    raise ValueError(
                        f"sample {self.key}: EHR extra {name!r} has shape {np.shape(got)}; "
                        f"it must have one value per token {self.data.shape}"
                    )

    def spacing_list(self) -> list[float]:
        if self.geometry is not None:
            return list(self.geometry.spacing)
        return [float(s) for s in self.spacing] if self.spacing else []


# One manifest row per sample. JSON-typed columns hold small, free-form, PHI-free dicts.
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("series_id", pa.string()),
        ("split", pa.string()),
        ("kind", pa.string()),
        ("modality", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("spacing", pa.list_(pa.float64())),
        ("sampling_rate", pa.float64()),
        ("channels", pa.list_(pa.string())),
        ("storage", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
        ("members", pa.string()),
        ("sha256", pa.string()),
        ("nbytes", pa.int64()),
        ("labels", pa.string()),
        ("has_label_map", pa.bool_()),
        ("synthetic", pa.bool_()),
        ("generator", pa.string()),
        ("licence", pa.string()),
        ("provenance", pa.string()),
        ("meta", pa.string()),
    ]
)
JSON_COLUMNS = ("members", "labels", "provenance", "meta")


class JSONText(str):
    """A value already encoded by `to_json`: stored as it is, not encoded again. A record's
    windows share one provenance, so the task encodes it once instead of once per window."""


def to_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no NaN (which is not JSON), so hashes are reproducible."""
    if isinstance(obj, JSONText):
        return str(obj)
    return _ENCODER.encode(obj)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        raise ValueError("non-finite float in JSON metadata")
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# One encoder for every call: json.dumps with options builds a new one each time, which costs
# as much as encoding a sample's small metadata dicts (a signal window writes nine of them).
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
)


def sample_row(
    sample: Sample,
    *,
    storage: str,
    shard: str,
    member: str,
    members: dict[str, dict[str, Any]],
    sha256: str,
    nbytes: int,
) -> dict[str, Any]:
    """The manifest row of a stored sample."""
    return {
        "key": sample.key,
        "dataset": sample.dataset,
        "patient_id": sample.patient_id,
        "study_id": sample.study_id,
        "series_id": sample.series_id,
        "split": sample.split,
        "kind": sample.kind,
        "modality": sample.modality,
        "shape": [int(s) for s in sample.data.shape],
        "dtype": sample.data.dtype.str,
        "spacing": sample.spacing_list(),
        "sampling_rate": sample.sampling_rate,
        "channels": list(sample.channels),
        "storage": storage,
        "shard": shard,
        "member": member,
        "members": to_json(members),
        "sha256": sha256,
        "nbytes": int(nbytes),
        "labels": to_json(sample.labels),
        "has_label_map": sample.label_map is not None,
        "synthetic": bool(sample.synthetic),
        "generator": sample.generator,
        "licence": sample.licence,
        "provenance": to_json(sample.provenance),
        "meta": to_json(sample.meta),
    }


LOCATION_FIELDS = frozenset({"storage", "shard", "member", "members", "sha256", "nbytes"})


def row_metadata_json(row: dict[str, Any]) -> str:
    """The `.json` member stored beside a tar sample: the row minus its location fields, as
    `to_json` of it decoded would give. The row's JSON columns are canonical text already and
    are spliced in as they are: decoding and encoding them again cost as much as the rest of
    a signal window's row."""
    plain = {k: v for k, v in row.items() if k not in LOCATION_FIELDS and k not in JSON_COLUMNS}
    spliced = {k: row[k] for k in JSON_COLUMNS if k in row and k not in LOCATION_FIELDS}
    marks = {k: f"\0{k}\0" for k in spliced}  # a string no encoded column can hold unescaped
    text = _ENCODER.encode({**plain, **marks})
    for k, raw in spliced.items():
        mark = _ENCODER.encode(marks[k])
        if text.count(mark) != 1:  # a plain field holds the same text: decode and re-encode
            return _ENCODER.encode({**plain, **{c: json.loads(v) for c, v in spliced.items()}})
        text = text.replace(mark, raw)
    return text
