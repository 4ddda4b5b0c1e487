"""The shard contract: sample schema, manifest, writers and readers. Every stage reads data
through this package and nothing else. See docs/shard-format.md and docs/readers.md."""

from .dataset import ShardDataset
from .errors import SchemaVersionError, ShardError, ShardFormatError, UnsafeMemberError
from .loader import ShardDataLoader, collate_samples
from .manifest import Manifest, write_manifest
from .mixing import MixedDataset
from .patches import PatchSampler
from .reader import ShardSet
from .sampleio import CountingStore
from .schema import KINDS, SCHEMA_VERSION, SPLITS, Geometry, Sample
from .storage import remove_temporaries
from .tarshard import DEFAULT_SHARD_BYTES, ShardFile
from .transforms import ItemTransform
from .verify import VerifyReport, verify
from .volume import DEFAULT_CHUNKS, VolumeHandle, open_volume
from .writer import SampleWriter, ShardSetWriter

__all__ = [
    "DEFAULT_CHUNKS",
    "DEFAULT_SHARD_BYTES",
    "KINDS",
    "SCHEMA_VERSION",
    "SPLITS",
    "CountingStore",
    "Geometry",
    "ItemTransform",
    "Manifest",
    "MixedDataset",
    "PatchSampler",
    "Sample",
    "SampleWriter",
    "SchemaVersionError",
    "ShardDataConfig",
    "ShardDataLoader",
    "ShardDataModule",
    "ShardDataset",
    "ShardError",
    "ShardFile",
    "ShardFormatError",
    "ShardSet",
    "ShardSetWriter",
    "SourceConfig",
    "UnsafeMemberError",
    "VerifyReport",
    "VolumeHandle",
    "collate_samples",
    "open_volume",
    "remove_temporaries",
    "verify",
    "write_manifest",
]

# The Lightning data module is imported on first use: importing Lightning takes seconds, and
# readers, writers and DataLoader workers should not pay for it.
_LAZY = {"ShardDataConfig", "ShardDataModule", "SourceConfig"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
