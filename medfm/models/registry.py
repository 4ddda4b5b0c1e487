"""The encoder registry: `@ENCODERS.register(name, ConfigClass)` on a factory."""

from medfm.registry import Registry

ENCODERS = Registry("encoder", group="medfm.encoders")
