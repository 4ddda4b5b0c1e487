"""The ingest spec: YAML validated into small dataclasses by the config engine (medfm.config).

Each section is owned by the component that uses it. Other modalities add top-level sections
with `register_section("signal", SignalSpec)`; they arrive parsed in `spec.sections["signal"]`.
Reader-specific settings of one source go in that source's `options:` mapping, handed to the
reader's constructor. Reading a spec file (checked against the registered readers) is
`medfm.ingest.load`. See ingest/specs/*.yaml for documented examples.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from medfm import config
from medfm.config import ConfigError
from medfm.io import sha256_bytes
from medfm.registry import Registry

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
# Top-level spec sections other components own. The signal section is imported when a spec
# names it, so reading a spec loads no reader module it does not need.
SECTIONS = Registry("spec section")
SECTIONS.register_lazy("signal", "medfm.ingest.signals.formats")


class SpecError(ConfigError):
    """An invalid spec; the message starts with the offending key."""


def register_section(name: str, cls: type) -> None:
    """Let another component own a top-level spec section (parsed into `spec.sections`)."""
    SECTIONS.register(name, cls)(cls)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """The config engine's `from_dict` for ingest dataclasses: errors are SpecErrors."""
    return config.from_dict(cls, data, where, error=SpecError)


@dataclass
class IdMapping:
    """Where a raw patient/study id comes from (it is pseudonymized before it is stored).

    from: auto (DICOM tag for DICOM, else `stem`) | dicom | stem | folder (first folder of the
    relative path) | regex (first group of `regex` on the relative path) | table (the labels
    table's `patient_id` / `study_id` column).
    """

    source: Literal["auto", "dicom", "stem", "folder", "regex", "table"] = field(
        default="auto", metadata={"key": "from"}
    )
    regex: str = ""


@dataclass
class LabelsTable:
    """Class labels from a CSV: one row per image, `key` column matched to the image stem or
    relative path; the other columns (or `columns`) become the sample's `labels`."""

    path: str
    key: str = "stem"
    match: Literal["stem", "rel"] = "stem"
    columns: list[str] = field(default_factory=list)


@dataclass
class DicomWebSpec:
    """QIDO-RS filters and transfer limits of a `root: dicomweb+http(s)://...` source (a PACS).
    Credentials never go here: MEDFM_DICOMWEB_USER / MEDFM_DICOMWEB_PASSWORD or
    MEDFM_DICOMWEB_TOKEN_FILE (ingest/dicomweb.py)."""

    modality: list[str] = field(default_factory=list)  # any of these (ModalitiesInStudy)
    study_date: str = ""  # DICOM range: 20200101-20201231, 20200101-, -20201231 or one date
    series_description: str = ""  # QIDO match, `*` and `?` wildcards
    accessions: str = ""  # CSV with an `accession` column; relative to the spec's folder
    concurrency: int = 4  # instances retrieved at once
    retries: int = 4  # extra attempts on 5xx, 429 and connection errors, exponential backoff
    backoff_s: float = 1.0  # first wait; doubled on each retry

    REFUSED_KEYS: ClassVar[dict[str, str]] = dict.fromkeys(
        ("user", "username", "password", "token", "auth", "authorization", "headers"),
        "DICOMweb credentials never go in the spec; set MEDFM_DICOMWEB_USER and "
        "MEDFM_DICOMWEB_PASSWORD, or MEDFM_DICOMWEB_TOKEN_FILE (a file holding a bearer token)",
    )


@dataclass
class SourceSpec:
    name: str
    root: str  # a folder, an fsspec URL, or dicomweb+http(s)://host/dicom-web (a PACS)
    include: list[str] = field(default_factory=lambda: ["**/*"])
    exclude: list[str] = field(default_factory=list)
    format: str = "auto"
    modality: str = ""
    label: str = ""
    # image,label CSV, or a Decathlon / nnU-Net v2 dataset.json; relative to the root
    label_pairs: str = ""
    labels_table: LabelsTable | None = None
    patient_id: IdMapping = field(default_factory=IdMapping)
    study_id: IdMapping = field(default_factory=lambda: IdMapping(source="auto"))
    licence: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    follow_symlinks: bool = False  # enter symlinked folders (each folder once: no loops)
    # Convert only the first N items (in path order) to try a spec; the manifest records it.
    limit: int | None = None
    dicomweb: DicomWebSpec | None = None  # filters of a dicomweb+ root
    # A fetched source's real root (its DICOMweb URL), while `root` names the local copy.
    origin: str = field(default="", metadata={"internal": True})


@dataclass
class VolumeSpec:
    """3D geometry: canonical orientation (ITK 3-letter code) and target spacing in mm."""

    orientation: str = "LPS"
    spacing: list[float] | None = None
    interpolation: Literal["linear", "bspline"] = "linear"


@dataclass
class IntensitySpec:
    """CT: raw HU int16 (stats recorded) or nnU-Net-style clip+z-score with dataset stats.
    MR and others: per-image percentile clip + z-score (float32), or raw."""

    ct: Literal["raw", "zscore"] = "raw"
    mr: Literal["zscore", "raw"] = "zscore"
    other: Literal["raw", "zscore"] = "raw"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    ct_foreground_hu: float = -500.0


@dataclass
class Image2DSpec:
    """Optional target size [H, W] for 2D images: `resize` (aspect kept, then pad) or `pad`."""

    size: list[int] | None = None
    mode: Literal["resize", "pad"] = "resize"


@dataclass
class SplitSpec:
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0


@dataclass
class ShardSpec:
    shard_bytes: int = 512 * 1024 * 1024
    chunks: list[int] = field(default_factory=lambda: [64, 64, 64])
    image_encoding: Literal["auto", "png", "npy"] = "auto"
    task_items: int | None = None  # None: sized by the job (ingest.job.task_sizes)
    task_bytes: int = 256 * 1024 * 1024
    pyramid_levels: int = 0  # volumes: downsampled OME-Zarr levels for viewers (docs/storage.md)


@dataclass
class DeidSpec:
    """De-identification. The key never appears here: MEDFM_DEID_KEY or `key_file`."""

    key_file: str = ""
    patient_namespace: str = ""
    keep_private_tags: bool = False
    allow_burned_in: bool = False
    keep_roi_names: bool = False  # RTSTRUCT ROIName is free text: recorded only on request
    hash_paths: bool = True  # false: real relative paths, an opt-in the manifest records

    REFUSED_KEYS: ClassVar[dict[str, str]] = dict.fromkeys(
        ("key", "secret"),
        "the de-identification key never goes in the spec; set MEDFM_DEID_KEY or point "
        "deid.key_file at a file",
    )


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
    sections: dict[str, Any] = field(default_factory=dict, metadata={"sections": SECTIONS})
    base_dir: str = field(default="", metadata={"internal": True})  # the spec file's folder

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)

    def fingerprint(self) -> str:
        """Hash of the settings that change outputs (resume refuses a different spec)."""
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        for s in d["sources"]:  # a fetched PACS source is the same job as before its fetch
            s["root"] = s.pop("origin") or s["root"]
        return sha256_bytes(json.dumps(d, sort_keys=True, default=str).encode())

    def settings(self) -> dict[str, Any]:
        """Transform settings recorded in provenance (no paths, nothing identifying)."""
        return {
            "volume": dataclasses.asdict(self.volume),
            "intensity": dataclasses.asdict(self.intensity),
            "image2d": dataclasses.asdict(self.image2d),
            # Sections other components own (signal:), so their settings are recorded too.
            **{
                k: dataclasses.asdict(v)
                for k, v in sorted(self.sections.items())
                if dataclasses.is_dataclass(v)
            },
        }


def check_spec(spec: IngestSpec, formats: list[str]) -> None:
    """What the types cannot say: names, patterns, list lengths, and `format` among `formats`
    (the registered readers)."""
    if not spec.sources:
        raise SpecError("sources: at least one source is required")
    names = set()
    for i, s in enumerate(spec.sources):
        if not NAME_RE.match(s.name):
            raise SpecError(f"sources[{i}].name: {s.name!r} must match {NAME_RE.pattern}")
        if s.name in names:
            raise SpecError(f"sources[{i}].name: {s.name!r} is used twice")
        names.add(s.name)
        if s.format != "auto" and s.format not in formats:
            raise SpecError(
                f"sources[{i}].format: unknown format {s.format!r}"
                f"{config.suggest(s.format, formats)}; use auto or one of {', '.join(formats)}"
            )
        if s.label and "{stem}" not in s.label:
            raise SpecError(f"sources[{i}].label: pattern must contain {{stem}}, got {s.label!r}")
        if s.label_pairs and s.label:
            raise SpecError(f"sources[{i}].label_pairs: give either label or label_pairs")
        if s.label_pairs and not s.label_pairs.lower().endswith((".csv", ".json")):
            raise SpecError(
                f"sources[{i}].label_pairs: an image,label .csv or a dataset.json, "
                f"got {s.label_pairs!r}"
            )
        for what, m in (("patient_id", s.patient_id), ("study_id", s.study_id)):
            if m.source == "regex":
                try:
                    if re.compile(m.regex).groups < 1:
                        raise re.error("needs one capturing group")
                except re.error as e:
                    raise SpecError(f"sources[{i}].{what}.regex: {e}") from e
        _check_dicomweb(f"sources[{i}]", s)
    _check_settings(spec)


DICOMWEB_SCHEME = "dicomweb+"
DICOM_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def _check_dicomweb(where: str, s: SourceSpec) -> None:
    if not s.root.startswith(DICOMWEB_SCHEME):
        if s.dicomweb is not None:
            raise SpecError(f"{where}.dicomweb: needs root: dicomweb+http(s)://host/dicom-web")
        return
    url = urlsplit(s.root[len(DICOMWEB_SCHEME) :])
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SpecError(f"{where}.root: give dicomweb+http://host:port/path or dicomweb+https://")
    if url.username or url.password:
        raise SpecError(f"{where}.root: {DicomWebSpec.REFUSED_KEYS['user']}")
    d = s.dicomweb or DicomWebSpec()
    if d.study_date in ("-",) or not DICOM_DATE_RANGE.match(d.study_date):
        raise SpecError(f"{where}.dicomweb.study_date: a DICOM date range, e.g. 20200101-20201231")
    if d.concurrency < 1 or d.retries < 0 or d.backoff_s < 0:
        raise SpecError(f"{where}.dicomweb: concurrency >= 1, retries and backoff_s >= 0")


def _check_settings(spec: IngestSpec) -> None:
    f = spec.split.fractions
    if len(f) not in (2, 3) or any(x < 0 for x in f) or sum(f) <= 0:
        raise SpecError("split.fractions: give 2 or 3 non-negative fractions (train, val[, test])")
    if spec.volume.spacing is not None and (
        len(spec.volume.spacing) != 3 or min(spec.volume.spacing) <= 0
    ):
        raise SpecError("volume.spacing: give three positive numbers in mm, or null")
    if len(spec.volume.orientation) != 3:
        raise SpecError("volume.orientation: a 3-letter ITK code such as LPS or RAS")
    for i, src in enumerate(spec.sources):
        if src.limit is not None and src.limit < 1:
            raise SpecError(f"sources[{i}].limit: give a positive number of items, or null")
    if len(spec.shards.chunks) != 3:
        raise SpecError("shards.chunks: give three chunk edges")
    if spec.shards.pyramid_levels:
        from medfm.shards.volume import MAX_PYRAMID_LEVELS  # zarr: only when asked for

        if not 0 < spec.shards.pyramid_levels <= MAX_PYRAMID_LEVELS:
            raise SpecError(f"shards.pyramid_levels: give 0 to {MAX_PYRAMID_LEVELS}")
    if spec.image2d.size is not None and len(spec.image2d.size) != 2:
        raise SpecError("image2d.size: give [height, width], or null")
    p = spec.intensity.percentiles
    if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
        raise SpecError("intensity.percentiles: give [low, high] with 0 <= low < high <= 100")
