"""Reader registry: how a discovered source file becomes `medfm.shards.Sample`s.

Contract for a reader (imaging here; signals and EHR register theirs the same way):

    @register_reader("nifti", extensions=(".nii", ".nii.gz"))
    class NiftiReader(Reader):
        def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
            ...

- `READERS` (a `medfm.registry.Registry`, entry-point group `medfm.readers`) holds them by
  format name; the built-in reader modules are imported on its first lookup, and an installed
  plug-in is found through its entry point (docs/ingest.md, "Adding a reader").
- `extensions` (lower-case, longest match wins) let `format: auto` pick the reader by file
  name; `sniff(head)` (the first 132 bytes) lets it claim files without a known extension.
  `companions` are file endings the reader consumes through another file (`.raw` beside `.mhd`,
  `.dat` beside `.hea`); `auto` discovery skips them instead of quarantining them.
- `scan(file, ctx)` runs in Ray tasks over every file before grouping and returns a small,
  picklable dict (it may hold PHI: it lives only in memory) or None. `group(files, scans, src)`
  runs on the driver and turns files into `SourceItem`s, the unit of work (a DICOM series, a
  WFDB record, one patient's EHR rows). The default: one item per file, no scan.
- `read(item, ctx)` runs in a Ray task and yields finished `Sample`s or `Quarantine` records.
  Raise `IngestError` (or a subclass) to quarantine the whole item: its message becomes the
  quarantine reason, so it must name the cause and hold no PHI (never a patient name, id, date
  or absolute path; the relative path is added by the machinery). Any other exception is also
  quarantined, with its type and a path-scrubbed message.
- Samples must use `ctx.patient(raw_id)` for `patient_id`, `ctx.split(patient_id)` for `split`,
  `ctx.sample_key(...)` for `key`, `ctx.uid(...)` for study/series ids and `ctx.shift_date(...)`
  (or `ctx.keyring.shift_datetime`) for any date. `medfm.ingest.sources.identity(ctx, item)`
  applies the source's patient/study id mapping and labels table in one call. The machinery
  then adds provenance (relative paths, input hashes, settings, medfm version), drops exact
  duplicates and writes the sample. Reader options come from the source's `options:` mapping;
  a whole new spec section is registered with `medfm.ingest.spec.register_section`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from medfm.io import sha256_bytes
from medfm.registry import Registry
from medfm.shards import Sample

from .privacy import Keyring, split_for

# Imported by name on the first lookup: the reader modules import this one.
BUILTIN_READER_MODULES = (
    "medfm.ingest.readers",
    "medfm.ingest.signals.formats",
    "medfm.ingest.ehr.formats",
)
READERS = Registry("reader", group="medfm.readers", modules=BUILTIN_READER_MODULES)


class IngestError(Exception):
    """A bad input: the message is the quarantine reason (PHI-free, names the cause)."""


class UnreadableInput(IngestError):
    """The file cannot be parsed or decoded (truncated, not the claimed format, corrupt)."""


class GeometryError(IngestError):
    """The image geometry is inconsistent (spacing, missing slices, orientation, tilt)."""


class LabelMismatch(IngestError):
    """A label map does not match its image in shape or physical space."""


class PrivacyError(IngestError):
    """The input cannot be de-identified safely (burned-in annotation)."""


class UnsupportedInput(IngestError):
    """A well-formed input of a kind this reader does not convert."""


@dataclass(frozen=True)
class SourceFile:
    """One input file: `path` for the filesystem, `rel` (relative to the source root) for
    records."""

    path: str
    rel: str
    size: int = 0


@dataclass
class SourceItem:
    """One unit of conversion: a file, a DICOM series, a record, a patient's rows."""

    source: str
    format: str
    files: tuple[SourceFile, ...]
    label: SourceFile | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def item_id(self) -> str:
        """Stable identity (hash of the relative paths): names resume bookkeeping."""
        parts = [self.source, self.format] + [f.rel for f in self.files]
        if "part" in self.info:  # items that share files (EHR patient buckets) differ by part
            parts.append(str(self.info["part"]))
        text = "\0".join(parts)
        return sha256_bytes(text.encode())[:24]

    @property
    def rel(self) -> str:
        """The relative path quarantine records and provenance show (first file)."""
        return self.files[0].rel if self.files else ""

    @property
    def nbytes(self) -> int:
        """Input bytes, for task sizes, progress and the summary. Items that share files (EHR
        buckets, `files=()`) carry their share of them in `info["nbytes"]`."""
        own = sum(f.size for f in self.files) + (self.label.size if self.label else 0)
        return own + int(self.info.get("nbytes", 0))


@dataclass
class Quarantine:
    """A rejected input (or part of one): relative path and PHI-free reason."""

    rel: str
    reason: str
    source: str = ""
    error: str = "IngestError"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "path": self.rel, "error": self.error, "reason": self.reason}


class ReadContext:
    """What a reader may use inside a task: the source's settings, privacy helpers, file access."""

    def __init__(
        self,
        fs: Any,
        source: Any,
        spec: Any,
        keyring: Keyring,
        stats: dict | None = None,
        item: SourceItem | None = None,
        digests: dict[str, str] | None = None,
    ):
        self.fs, self.source, self.spec, self.keyring = fs, source, spec, keyring
        self.stats, self.item = stats or {}, item
        self.digests = digests if digests is not None else {}

    def record_digest(self, f: SourceFile, data: bytes) -> None:
        """sha256 of a whole input file a reader holds in memory: provenance need not re-read it."""
        self.digests[f.path] = sha256_bytes(data)

    def patient(self, raw_id: str) -> str:
        return self.keyring.patient(raw_id, self.spec.deid.patient_namespace)

    def split(self, patient_pseudonym: str) -> str:
        return split_for(
            self.keyring, patient_pseudonym, self.spec.split.fractions, self.spec.split.seed
        )

    def uid(self, raw_uid: str, kind: str = "uid") -> str:
        return self.keyring.token(kind, raw_uid)

    def sample_key(self, *parts: str) -> str:
        """Keyed, PHI-free sample key; includes the item identity, so two inputs never collide."""
        item_id = self.item.item_id if self.item else ""
        return f"{self.source.name}-{self.keyring.token('key', item_id, *parts)[:24]}"

    def shift_date(self, raw_patient_id: str, date: str) -> str:
        return self.keyring.shift_date(raw_patient_id, date)

    @contextmanager
    def local_path(self, f: SourceFile) -> Iterator[str]:
        """A local file path for libraries that cannot read fsspec streams (SimpleITK)."""
        if type(self.fs).__name__ == "LocalFileSystem":
            yield f.path
            return
        suffix = "".join(re.findall(r"\.[A-Za-z0-9]+", os.path.basename(f.path))[-2:])
        with tempfile.TemporaryDirectory(prefix="medfm-ingest-") as tmp:
            local = os.path.join(tmp, "input" + suffix)
            self.fs.get(f.path, local)
            yield local


@dataclass
class PrepareContext:
    """What `Reader.prepare` gets on the driver: Ray, and a work folder under the destination.
    `progress`: the job's flag; a prepare pass shows its progress lines only when it is set.
    `workers`: the job's cap on Ray tasks at once (None: every CPU), which prepare passes keep.
    `kept`: in an --append, what the set's earlier version fitted for this source (EHR: its
    vocabulary's URL and dataset record), which the pass reuses instead of fitting again."""

    spec: Any
    source: Any
    keyring: Keyring
    fs: Any  # the source's filesystem
    dest: str
    work_dir: str
    ray: Any
    progress: bool = True
    workers: int | None = None
    kept: dict[str, Any] | None = None


class Reader:
    """Base reader: one item per file, no header scan. Subclasses implement `read`."""

    name = ""
    extensions: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()

    def __init__(self, **options: Any):
        self.options = options

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        return False

    def scan(self, f: SourceFile, ctx: ReadContext) -> dict[str, Any] | None:
        return None

    def group(
        self, files: list[SourceFile], scans: dict[str, Any], source: Any
    ) -> Iterable[SourceItem | Quarantine]:
        for f in files:
            yield SourceItem(source.name, self.name, (f,))

    def prepare(self, items: list[SourceItem], ctx: PrepareContext) -> dict[str, Any]:
        """Optional driver-side pass before conversion (an EHR vocabulary fitted on train).

        Returns JSON-able stats that `read` finds in `ctx.stats[source name]`. Optional keys:
        "artifacts" (files it wrote, relative to the destination, listed in the manifest),
        "quarantine" (records), "dataset" (merged into the manifest's dataset record).
        """
        return {}

    def read(self, item: SourceItem, ctx: ReadContext) -> Iterator[Sample | Quarantine]:
        raise NotImplementedError


def register_reader(name: str, *, extensions: Iterable[str] = (), companions: Iterable[str] = ()):
    """Class decorator: make a `Reader` subclass available as spec `format: <name>`.

    One class may serve several formats (png, jpeg, tiff): each gets a subclass that carries its
    own name, extensions and companions."""

    def wrap(cls: type[Reader]) -> type[Reader]:
        attrs = {
            "name": name,
            "extensions": tuple(e.lower() for e in extensions) or cls.extensions,
            "companions": tuple(e.lower() for e in companions) or cls.companions,
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
        }
        READERS.register(name)(type(cls.__name__, (cls,), attrs))
        return cls

    return wrap


def create_reader(name: str, **options: Any) -> Reader:
    """The reader for spec `format: <name>`, built with the source's `options:`."""
    return READERS.get(name)(**options)


def _readers() -> list[type[Reader]]:
    return [e.factory for e in READERS.entries()]


def reader_for(rel: str, head: bytes | None = None) -> str | None:
    """The registered format for a file name (longest extension wins), else by content sniff."""
    low = rel.lower()
    readers = _readers()
    best = max(
        ((len(ext), cls.name) for cls in readers for ext in cls.extensions if low.endswith(ext)),
        default=None,
    )
    if best:
        return best[1]
    if head is not None:
        for cls in readers:  # sorted by name: the first that claims the bytes wins
            if cls.sniff(head):
                return cls.name
    return None


def known_extensions() -> set[str]:
    return {e for cls in _readers() for e in cls.extensions}


def is_companion(rel: str) -> bool:
    low = rel.lower()
    return any(low.endswith(ext) for cls in _readers() for ext in cls.companions)
