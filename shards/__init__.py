"""The shard contract: sample schema, manifest, writers and readers. Every stage reads data
through this package and nothing else. See docs/shard-format.md."""

from .errors import SchemaVersionError, ShardError, ShardFormatError, UnsafeMemberError
from .manifest import Manifest, write_manifest
from .reader import ShardSet
from .schema import KINDS, SCHEMA_VERSION, SPLITS, Geometry, Sample
from .storage import remove_temporaries
from .tarshard import DEFAULT_SHARD_BYTES, ShardFile
from .verify import VerifyReport, verify
from .volume import DEFAULT_CHUNKS, VolumeHandle, open_volume
from .writer import SampleWriter, ShardSetWriter

__all__ = [
    "DEFAULT_CHUNKS",
    "DEFAULT_SHARD_BYTES",
    "KINDS",
    "SCHEMA_VERSION",
    "SPLITS",
    "Geometry",
    "Manifest",
    "Sample",
    "SampleWriter",
    "SchemaVersionError",
    "ShardError",
    "ShardFile",
    "ShardFormatError",
    "ShardSet",
    "ShardSetWriter",
    "UnsafeMemberError",
    "VerifyReport",
    "VolumeHandle",
    "open_volume",
    "remove_temporaries",
    "verify",
    "write_manifest",
]
