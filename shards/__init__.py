"""The shard contract: sample schema, manifest, writers and readers. Every stage reads data
through this package and nothing else. See docs/shard-format.md and docs/readers.md."""

from medfm.io import remove_temporaries

from .errors import SchemaVersionError, ShardError, ShardFormatError, UnsafeMemberError
from .manifest import Manifest, write_manifest
from .reader import ShardSet
from .sampleio import CountingStore
from .schema import KINDS, SCHEMA_VERSION, SPLITS, Geometry, Sample
from .synthetic import SyntheticConfig, audit_verdict, check_synthetic, check_training_set
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
    "SyntheticConfig",
    "UnsafeMemberError",
    "VerifyReport",
    "VolumeHandle",
    "audit_verdict",
    "check_synthetic",
    "check_training_set",
    "collate_samples",
    "open_volume",
    "remove_temporaries",
    "select_rows",
    "verify",
    "write_manifest",
]

# Readers that need torch, and the Lightning data module, are imported on first use: importing
# torch takes seconds (Lightning more), and ingest workers, writers and verify need neither.
_LAZY = {
    "ShardDataConfig": "datamodule",
    "ShardDataModule": "datamodule",
    "SourceConfig": "datamodule",
    "ShardDataset": "dataset",
    "select_rows": "dataset",
    "ShardDataLoader": "loader",
    "collate_samples": "loader",
    "MixedDataset": "mixing",
    "PatchSampler": "patches",
    "ItemTransform": "transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
