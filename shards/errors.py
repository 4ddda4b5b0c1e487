"""Errors raised by the shard contract. Each message names the file and the cause."""


class ShardError(Exception):
    """Base class for everything wrong with a shard set."""


class ShardFormatError(ShardError):
    """A shard, manifest or member is corrupt, truncated, unsafe or inconsistent."""


class SchemaVersionError(ShardError):
    """The manifest was written by a newer medfm with a schema this reader does not know."""


class UnsafeMemberError(ShardFormatError):
    """A tar member that must never be read or extracted (path traversal, link, device...)."""
