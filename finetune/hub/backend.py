"""Hub backends: the `HubBackend` protocol and which backend serves a URL.

A backend is a class registered in `HUB_BACKENDS` whose constructor takes one location (a path
or URL, or None for its default). The URL scheme picks it:

    a path or file://URL     -> local    (LocalHub, finetune/hub/local.py)
    NAME://...               -> NAME     for any registered backend NAME (hf, a plug-in's name)
    any other fsspec URL     -> fsspec   (FsspecHub, finetune/hub/fsspec_hub.py: memory://, s3://)

A plug-in registers its own: `@HUB_BACKENDS.register("myhub")` in a module imported by the
`medfm.hub_backends` entry point, and `myhub://...` is served by it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import fsspec
from fsspec.core import split_protocol

from medfm.config import ConfigError
from medfm.registry import Registry

from .errors import HubError
from .transfer import PullReport

HUB_BACKENDS = Registry("hub backend", group="medfm.hub_backends")


@runtime_checkable
class HubBackend(Protocol):
    """What every hub does; `repo` is NAME or OWNER/NAME, `rev` a named ref or an immutable id."""

    def push(self, folder: str | Path, repo: str, ref: str = "main") -> str:
        """Publish `folder` as a revision of `repo` and point `ref` at it; returns its id."""
        ...

    def pull(self, repo: str, rev: str | None, dest: str | Path | None = None) -> PullReport:
        """Download a revision (default main) into `dest`, verifying every file's hash."""
        ...

    def ls(self) -> dict[str, dict[str, str]]:
        """{repo as it is referenced: {ref: revision id}}."""
        ...

    def resolve(self, repo: str, rev: str | None) -> str:
        """The immutable revision id that `rev` (default main) names now, nothing downloaded."""
        ...


def default_root() -> str:
    """The embedded hub that plain `owner/name` references live in."""
    return os.environ.get("MEDFM_HUB") or str(Path("~/.cache/medfm/hub").expanduser())


def backend_class(name: str, where: str) -> type[HubBackend]:
    """The registered backend `name`; an unknown one is a HubError naming the registered ones."""
    try:
        return HUB_BACKENDS.get(name, where)
    except ConfigError as e:
        raise HubError(str(e)) from e


def backend_name(url: str) -> str:
    """The backend name for a hub path or URL (module docstring); an unknown scheme comes back
    as it is, and looking it up fails with the registered names."""
    scheme, _ = split_protocol(url)
    if scheme is None:
        return "local"
    first = scheme.split("::")[0]  # a chained URL (simplecache::s3://...) is fsspec's
    if first in HUB_BACKENDS:
        return first
    if first == "file":
        return "local"
    return "fsspec" if first in fsspec.available_protocols() else first


def open_hub(url: str | None = None) -> HubBackend:
    """The backend rooted at `url` (default: $MEDFM_HUB), picked by the URL's scheme."""
    url = url or default_root()
    return backend_class(backend_name(url), url)(url)
