"""The ingest spec: a YAML file validated into small dataclasses, errors naming the bad key.

Each section is owned by the component that uses it. Other modalities add top-level sections
with `register_section("signal", SignalSpec)`; they arrive parsed in `spec.sections["signal"]`.
Reader-specific settings of one source go in that source's `options:` mapping, handed to the
reader's constructor. See ingest/specs/*.yaml for documented examples.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
_SECTIONS: dict[str, type] = {}


class SpecError(ValueError):
    """An invalid spec; the message starts with the offending key."""


def choice(*options: str, default: str) -> Any:
    return field(default=default, metadata={"choices": options})


@dataclass
class IdMapping:
    """Where a raw patient/study id comes from (it is pseudonymized before it is stored).

    from: auto (DICOM tag for DICOM, else `stem`) | dicom | stem | folder (first folder of the
    relative path) | regex (first group of `regex` on the relative path) | table (the labels
    table's `patient_id` / `study_id` column).
    """

    source: str = choice("auto", "dicom", "stem", "folder", "regex", "table", default="auto")
    regex: str = ""


@dataclass
class LabelsTable:
    """Class labels from a CSV: one row per image, `key` column matched to the image stem or
    relative path; the other columns (or `columns`) become the sample's `labels`."""

    path: str
    key: str = "stem"
    match: str = choice("stem", "rel", default="stem")
    columns: list[str] = field(default_factory=list)


@dataclass
class SourceSpec:
    name: str
    root: str
    include: list[str] = field(default_factory=lambda: ["**/*"])
    exclude: list[str] = field(default_factory=list)
    format: str = "auto"
    modality: str = ""
    label: str = ""
    labels_table: LabelsTable | None = None
    patient_id: IdMapping = field(default_factory=IdMapping)
    study_id: IdMapping = field(default_factory=lambda: IdMapping(source="auto"))
    licence: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class VolumeSpec:
    """3D geometry: canonical orientation (ITK 3-letter code) and target spacing in mm."""

    orientation: str = "LPS"
    spacing: list[float] | None = None
    interpolation: str = choice("linear", "bspline", default="linear")


@dataclass
class IntensitySpec:
    """CT: raw HU int16 (stats recorded) or nnU-Net-style clip+z-score with dataset stats.
    MR and others: per-image percentile clip + z-score (float32), or raw."""

    ct: str = choice("raw", "zscore", default="raw")
    mr: str = choice("zscore", "raw", default="zscore")
    other: str = choice("raw", "zscore", default="raw")
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    ct_foreground_hu: float = -500.0


@dataclass
class Image2DSpec:
    """Optional target size [H, W] for 2D images: `resize` (aspect kept, then pad) or `pad`."""

    size: list[int] | None = None
    mode: str = choice("resize", "pad", default="resize")


@dataclass
class SplitSpec:
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0


@dataclass
class ShardSpec:
    shard_bytes: int = 512 * 1024 * 1024
    chunks: list[int] = field(default_factory=lambda: [64, 64, 64])
    image_encoding: str = choice("auto", "png", "npy", default="auto")
    task_items: int = 64
    task_bytes: int = 256 * 1024 * 1024


@dataclass
class DeidSpec:
    """De-identification. The key never appears here: MEDFM_DEID_KEY or `key_file`."""

    key_file: str = ""
    patient_namespace: str = ""
    keep_private_tags: bool = False
    allow_burned_in: bool = False
    hash_paths: bool = False


@dataclass
class DedupSpec:
    exact: bool = True
    near_hamming: int = 4


@dataclass
class IngestSpec:
    sources: list[SourceSpec]
    volume: VolumeSpec = field(default_factory=VolumeSpec)
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    image2d: Image2DSpec = field(default_factory=Image2DSpec)
    split: SplitSpec = field(default_factory=SplitSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)
    deid: DeidSpec = field(default_factory=DeidSpec)
    dedup: DedupSpec = field(default_factory=DedupSpec)
    sections: dict[str, Any] = field(default_factory=dict)
    base_dir: str = ""

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)

    def fingerprint(self) -> str:
        """Hash of the settings that change outputs (resume refuses a different spec)."""
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    def settings(self) -> dict[str, Any]:
        """Transform settings recorded in provenance (no paths, nothing identifying)."""
        return {
            "volume": dataclasses.asdict(self.volume),
            "intensity": dataclasses.asdict(self.intensity),
            "image2d": dataclasses.asdict(self.image2d),
        }


def register_section(name: str, cls: type) -> None:
    """Let another component own a top-level spec section (parsed into `spec.sections`)."""
    _SECTIONS[name] = cls


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        (arg,) = typing.get_args(tp)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise SpecError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise SpecError(f"{where or 'spec'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is IdMapping and "from" in data:
        data = {("source" if k == "from" else k): v for k, v in data.items()}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields or key in ("sections", "base_dir"):
            if cls is IngestSpec and key in _SECTIONS:
                kwargs.setdefault("sections", {})[key] = from_dict(_SECTIONS[key], value, path)
                continue
            if cls is DeidSpec and key in ("key", "secret"):
                raise SpecError(
                    f"{path}: the de-identification key never goes in the spec; set "
                    "MEDFM_DEID_KEY or point deid.key_file at a file"
                )
            close = difflib.get_close_matches(str(key), list(fields) + list(_SECTIONS), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{path}: unknown key{hint}")
        value = _convert(hints[key], value, path)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise SpecError(f"{path}: {value!r} is not one of {', '.join(choices)}")
        kwargs[key] = value
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SpecError(f"{where + '.' if where else ''}{missing[0]}: required key is missing")
    return cls(**kwargs)


def _check(spec: IngestSpec) -> None:
    from .registry import READERS

    if not spec.sources:
        raise SpecError("sources: at least one source is required")
    names = set()
    for i, s in enumerate(spec.sources):
        if not NAME_RE.match(s.name):
            raise SpecError(f"sources[{i}].name: {s.name!r} must match {NAME_RE.pattern}")
        if s.name in names:
            raise SpecError(f"sources[{i}].name: {s.name!r} is used twice")
        names.add(s.name)
        if s.format != "auto" and s.format not in READERS:
            raise SpecError(
                f"sources[{i}].format: unknown format {s.format!r}; "
                f"use auto or one of {', '.join(READERS.names())}"
            )
        if s.label and "{stem}" not in s.label:
            raise SpecError(f"sources[{i}].label: pattern must contain {{stem}}, got {s.label!r}")
        for what, m in (("patient_id", s.patient_id), ("study_id", s.study_id)):
            if m.source == "regex":
                try:
                    if re.compile(m.regex).groups < 1:
                        raise re.error("needs one capturing group")
                except re.error as e:
                    raise SpecError(f"sources[{i}].{what}.regex: {e}") from e
    f = spec.split.fractions
    if len(f) not in (2, 3) or any(x < 0 for x in f) or sum(f) <= 0:
        raise SpecError("split.fractions: give 2 or 3 non-negative fractions (train, val[, test])")
    if spec.volume.spacing is not None and (
        len(spec.volume.spacing) != 3 or min(spec.volume.spacing) <= 0
    ):
        raise SpecError("volume.spacing: give three positive numbers in mm, or null")
    if len(spec.volume.orientation) != 3:
        raise SpecError("volume.orientation: a 3-letter ITK code such as LPS or RAS")
    if len(spec.shards.chunks) != 3:
        raise SpecError("shards.chunks: give three chunk edges")
    if spec.image2d.size is not None and len(spec.image2d.size) != 2:
        raise SpecError("image2d.size: give [height, width], or null")
    p = spec.intensity.percentiles
    if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
        raise SpecError("intensity.percentiles: give [low, high] with 0 <= low < high <= 100")


def load_spec(path: str | Path) -> IngestSpec:
    """Read and validate a spec file; relative source roots resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read spec ({e})") from e
    return parse_spec(data, base_dir=str(path.parent.resolve()))


def parse_spec(data: Any, base_dir: str = "") -> IngestSpec:
    from .registry import READERS

    READERS.names()  # reader modules register their spec sections (signal:) on import
    spec = from_dict(IngestSpec, data)
    spec.base_dir = base_dir
    for s in spec.sources:
        s.root = os.path.expandvars(s.root)
        if s.labels_table is not None:
            s.labels_table.path = os.path.expandvars(s.labels_table.path)
        if "://" not in s.root and base_dir and not Path(s.root).is_absolute():
            s.root = str(Path(base_dir, s.root).resolve())
        s.root = str(Path(s.root).expanduser()) if "://" not in s.root else s.root
    _check(spec)
    return spec
