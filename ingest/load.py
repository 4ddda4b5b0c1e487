"""Reading an ingest spec: YAML plus `key=value` overrides, validated by the config engine and
checked against the registered readers.

This sits above the reader registry (spec.py below it holds only the dataclasses), so the
readers can import the spec without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medfm.config import ConfigError, read_tree

from .registry import READERS
from .spec import IngestSpec, SpecError, check_spec, from_dict


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> IngestSpec:
    """Read and validate a spec file; relative source roots resolve against its folder."""
    path = Path(path)
    try:
        tree = read_tree(path, overrides)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    return parse_spec(tree, base_dir=str(path.parent.resolve()))


def parse_spec(data: Any, base_dir: str = "") -> IngestSpec:
    """Validate a spec mapping (`${VAR}` already expanded by the engine)."""
    spec = from_dict(IngestSpec, data)
    spec.base_dir = base_dir
    for s in spec.sources:
        if "://" not in s.root:
            root = Path(s.root).expanduser()
            if base_dir and not root.is_absolute():
                root = Path(base_dir, root).resolve()
            s.root = str(root)
    check_spec(spec, READERS.names())
    return spec
