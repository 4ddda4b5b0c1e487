"""The config engine every stage uses: YAML plus `key=value` overrides into small @dataclasses.

Ingest specs, pretrain, finetune and audit configs all load through `read_tree` + `from_dict`,
so they share one set of rules (docs/configs.md):

- validation is strict and happens before any data is read; every message starts with the
  offending key's path (`sources[1].format: ...`, `train.lr: expected float, got 'fast'`);
- unknown keys and unknown `Literal` values get a "did you mean" from difflib;
- every arm of a Union is tried; ints are accepted as floats, lists as tuples;
- `${VAR}` and `${VAR:-default}` in string values expand from the environment (an unset
  variable without a default is an error); where text does not fit the field, the expanded text
  is read as YAML (`max_steps: ${STEPS:-100}` is an int). Untyped values (`Any`: reader
  `options`, `model`, `objectives`) expand when the dataclass that owns them validates them;
- `key=value` overrides (`train.lr=1e-3`, `sources[1].format=png`, `objectives.0.name=mae`)
  edit the raw tree before validation, the value read as YAML.

Field metadata a dataclass may use: `{"key": "from"}` (the YAML name, when it is a Python
keyword), `{"internal": True}` (set by the loader, never from a file), `{"sections": registry}`
(a dict field collecting the extra top-level keys `registry` knows, each validated by the
dataclass registered for it). A class attribute `REFUSED_KEYS = {key: reason}` refuses keys with
a reason instead of a guess (a secret that must never be written into a config).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
KEY_RE = re.compile(r"^[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*$")
KEY_PART_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
NONE = type(None)


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the offending key's path."""


# ---------------------------------------------------------------- messages


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: Any, options: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if tp is NONE:
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def format_path(parts: Iterable[str | int]) -> str:
    """`["sources", 1, "format"]` -> `sources[1].format`, the form every message uses."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# ---------------------------------------------------------------- ${VAR}


def expand_env(text: str, where: str) -> str:
    """`${VAR}` / `${VAR:-default}` in `text` from the environment; unset without default fails."""

    def one(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None and default is None:
            raise ConfigError(
                f"{where}: environment variable {name} is not set "
                f"(write ${{{name}:-default}} for a fallback)"
            )
        return value or (default or "")  # as in the shell, `:-` also replaces an empty value

    return ENV_RE.sub(one, text)


def _coerce_expanded(tp: Any, text: str, where: str) -> Any:
    """An expanded `${VAR}` value: as text where text fits, else read as YAML (a number...)."""
    try:
        return _coerce(tp, text, where, expand=False)
    except ConfigError:
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
        if isinstance(parsed, str):
            raise
        return _coerce(tp, parsed, where, expand=False)


# ---------------------------------------------------------------- type checks


def _union(tp: Any, value: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and NONE in args:
        return None
    errors = []
    for arm in (a for a in args if a is not NONE):
        try:
            return _coerce(arm, value, where, expand=False)
        except ConfigError as e:
            errors.append(e)
    # An arm whose error lies inside the value (`x.path: ...`) took its shape: that error is the
    # one to fix. Otherwise no arm fits at all: say what would.
    inner = [e for e in errors if str(e).startswith((f"{where}.", f"{where}["))]
    if inner or len(errors) == 1:
        raise (inner or errors)[0]
    options = [o for a in args if typing.get_origin(a) is Literal for o in typing.get_args(a)]
    hint = suggest(value, options) if isinstance(value, str) else ""
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}{hint}")


def _coerce(tp: Any, value: Any, where: str, expand: bool = True) -> Any:
    """`value` checked against type hint `tp`; `where` is its path for messages."""
    if tp is Any:
        return value  # expanded where a dataclass types it (reader options, encoder params)
    if expand and isinstance(value, str) and "${" in value:
        return _coerce_expanded(tp, expand_env(value, where), where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(tp, value, where)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            hint = suggest(value, args) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: expected one of {list(args)}, got {_show(value)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {_show(value)}")
            items = args
        else:
            items = [args[0] if args else Any] * len(value)
        out = [
            _coerce(t, v, f"{where}[{i}]")
            for i, (t, v) in enumerate(zip(items, value, strict=True))
        ]
        return tuple(out) if tuple in (origin, tp) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_RE.match(value):
        return float(value)  # PyYAML reads `1e-4` (no dot) as a string
    if tp in (int, float, str) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
    return value


# ---------------------------------------------------------------- dataclasses


def _keys(cls: type) -> dict[str, dataclasses.Field]:
    """YAML key -> field, for the fields a config may set (the Python name always works)."""
    keys = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.metadata.get("sections") is not None:
            continue
        keys[f.name] = f
        if "key" in f.metadata:
            keys[f.metadata["key"]] = f
    return keys


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    keys = _keys(cls)
    sections = next(
        (f for f in dataclasses.fields(cls) if f.metadata.get("sections") is not None), None
    )
    known = sections.metadata["sections"].names() if sections else []
    refused = getattr(cls, "REFUSED_KEYS", {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in keys:
            kwargs[keys[key].name] = _coerce(hints[keys[key].name], value, path)
        elif key in known:
            parsed = sections.metadata["sections"].config(key, value, path)
            kwargs.setdefault(sections.name, {})[key] = parsed
        elif key in refused:
            raise ConfigError(f"{path}: {refused[key]}")
        else:
            allowed = sorted({*keys, *known})
            hint = suggest(key, allowed) or f" (allowed: {', '.join(allowed)})"
            raise ConfigError(f"{path}: unknown key{hint}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise ConfigError(f"{where + '.' if where else ''}{f.name}: required key is missing")
    return cls(**kwargs)


def from_dict(cls: type, data: Any, where: str = "", error: type[ConfigError] = ConfigError) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types by path.

    `error` is the ConfigError subclass to raise (ingest raises its SpecError)."""
    try:
        return _build(cls, data, where)
    except ConfigError as e:
        if isinstance(e, error):
            raise
        raise error(str(e)) from None


# ---------------------------------------------------------------- overrides and files


def parse_key(key: str) -> list[str | int]:
    """`sources[1].format` or `sources.1.format` -> `["sources", 1, "format"]`."""
    key = key.strip()
    if not KEY_RE.match(key):
        raise ConfigError(f"override key {key!r}: expected a path such as train.lr or a[0].b")
    return [int(i or n) if (i or n.isdigit()) else n for n, i in KEY_PART_RE.findall(key)]


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (a dotted path, list indices allowed) in `tree`, creating missing sections."""
    parts = parse_key(key)
    node: Any = tree
    for i, part in enumerate(parts):
        where = format_path(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"{where}: no list item {part!r} (the list has {len(node)})")
        elif isinstance(node, dict):
            part = str(part)
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise ConfigError(f"{format_path(parts[:i])}: is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node[part]


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `a.b[0].c=value` override in place; `value` is read as YAML (1e-3, [1,2], null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: override value {raw!r} is not valid YAML") from e
    set_key(tree, key, value)


def read_tree(
    path: str | Path | None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    base: dict | None = None,
) -> dict[str, Any]:
    """The raw config mapping: YAML from `path` (or a copy of `base`) with overrides applied:
    `key=value` strings (the command line) or a {dotted key: value} mapping (Python callers)."""
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping, got {_show(tree)}")
    else:
        tree = json.loads(json.dumps(base or {}))
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_key(tree, key, value)
    else:
        for item in overrides:
            apply_override(tree, item)
    return tree
