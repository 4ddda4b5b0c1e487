"""One registry type for every extension point, timm-style: a name maps to a factory.

    ENCODERS = Registry("encoder", group="medfm.encoders")

    @ENCODERS.register("vit2d", ViT2DConfig)        # config dataclass optional
    def vit2d(cfg: ViT2DConfig) -> ViT2D: ...

    ENCODERS.build("vit2d", {"img_size": 28})       # params validated against ViT2DConfig

Four ways an entry gets in, so that importing a registry stays cheap:
- `@register(name, ConfigClass)` in a module that the registry's package imports;
- `Registry(..., modules=("pkg.readers",))`: built-in modules imported on the first lookup of any
  name (the ingest readers, whose modules import the registry: a static import would be a cycle);
- `register_lazy(name, "module.path")`: the module is imported on the first lookup of `name`
  (the diffusion objective, whose diffusers import takes seconds, is one);
- a Python entry point in the registry's `group` (`medfm.readers`, `medfm.encoders`, ...): an
  installed plug-in declares `[project.entry-points."medfm.encoders"] my_vit = "pkg.my_vit"` and
  importing `pkg.my_vit` registers `my_vit`, the way pytest and timm find plug-ins.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from medfm.config import ConfigError, from_dict


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    config_cls: type | None


class Registry:
    """Name -> (factory, optional config dataclass); `kind` names what is registered."""

    def __init__(self, kind: str, group: str | None = None, modules: Iterable[str] = ()):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._lazy: dict[str, str] = {}  # name -> module that registers it when imported
        self._modules = tuple(modules)  # imported, then the plug-ins, on the first lookup
        self._loaded = False

    def register(self, name: str, config_cls: type | None = None) -> Callable[[Any], Any]:
        def wrap(factory: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, config_cls)
            return factory

        return wrap

    def unregister(self, name: str) -> None:
        """Remove `name` (a test's temporary entry, a plug-in reloaded in a notebook)."""
        self._entries.pop(name, None)
        self._lazy.pop(name, None)

    def register_lazy(self, name: str, module: str) -> None:
        """`name` is registered by importing `module`, which happens on its first lookup."""
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._lazy[name] = module

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a module being imported may look names up
        try:
            for module in self._modules:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False  # a failed built-in import fails every lookup, not just this one
            raise
        if self.group is not None:
            for ep in entry_points(group=self.group):
                self._load_plugin(ep)

    def _load_plugin(self, ep: Any) -> None:
        if ep.name in self._entries or ep.name in self._lazy:
            return  # a built-in of that name wins; the plug-in is not imported
        try:
            ep.load()
        except Exception as e:  # one broken plug-in must not take the registry down
            warnings.warn(
                f"medfm plug-in {ep.value!r} ({self.group}) failed to load: {e}", stacklevel=3
            )
            return
        if ep.name not in self._entries:
            warnings.warn(
                f"medfm plug-in {ep.value!r} ({self.group}) did not register {self.kind} "
                f"{ep.name!r}",
                stacklevel=3,
            )

    def _resolve_lazy(self, name: str) -> None:
        module = self._lazy.pop(name, None)
        if module is not None:
            importlib.import_module(module)
            if name not in self._entries:
                raise RuntimeError(f"{module} did not register {self.kind} {name!r}")

    def names(self) -> list[str]:
        self._load()
        return sorted({*self._entries, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def entry(self, name: str, where: str = "") -> Entry:
        if name not in self._entries:
            self._load()
            self._resolve_lazy(name)
        if name not in self._entries:
            at = f"{where}: " if where else ""
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{at}unknown {self.kind} {name!r}{hint}; registered: {self.names()}")
        return self._entries[name]

    def get(self, name: str, where: str = "") -> Any:
        """The registered factory (a class or function) itself."""
        return self.entry(name, where).factory

    def entries(self) -> list[Entry]:
        """Every entry by name, lazy ones imported: what lookups over all entries (a reader by
        file extension) and the registry sweeps in the tests walk."""
        self._load()
        for name in list(self._lazy):
            self._resolve_lazy(name)
        return [self._entries[name] for name in sorted(self._entries)]

    def config(self, name: str, params: dict[str, Any], where: str = "") -> Any:
        """The entry's validated config dataclass for `params`."""
        cls = self.entry(name, where).config_cls
        if cls is None:
            raise TypeError(f"{self.kind} {name!r} takes no config")
        return from_dict(cls, params, where)

    def build(self, name: str, params: dict[str, Any], *args: Any, where: str = "") -> Any:
        return self.entry(name, where).factory(self.config(name, params, where), *args)
