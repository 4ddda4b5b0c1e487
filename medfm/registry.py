"""A timm-style registry: `@REGISTRY.register("name", ConfigClass)` maps a name to a factory.

Each entry owns a small @dataclass config; `build(name, params)` validates `params` against it
(unknown keys and wrong types fail with the key's path) before anything is constructed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medfm.config import ConfigError, from_dict


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    config_cls: type


class Registry:
    """Name -> (factory, config dataclass); `kind` names what is registered, for messages."""

    def __init__(self, kind: str, load_plugins: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._load_plugins = load_plugins  # imports optional entries on first miss

    def register(self, name: str, config_cls: type) -> Callable[[Callable], Callable]:
        def wrap(factory: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, config_cls)
            return factory

        return wrap

    def _plugins(self) -> None:
        if self._load_plugins is not None:
            load, self._load_plugins = self._load_plugins, None
            load()

    def names(self) -> list[str]:
        self._plugins()
        return sorted(self._entries)

    def entry(self, name: str, where: str = "") -> Entry:
        if name not in self._entries:
            self._plugins()
        if name not in self._entries:
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def config(self, name: str, params: dict[str, Any], where: str = "") -> Any:
        """The entry's validated config dataclass for `params`."""
        return from_dict(self.entry(name, where).config_cls, params, where)

    def build(self, name: str, params: dict[str, Any], *args: Any, where: str = "") -> Any:
        return self.entry(name, where).factory(self.config(name, params, where), *args)
