"""The encoder registry: `@ENCODERS.register(name, ConfigClass)` on a factory."""

from ..registry import Registry

ENCODERS = Registry("encoder")
