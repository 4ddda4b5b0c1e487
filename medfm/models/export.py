"""Encoder export: weights as safetensors plus a JSON sidecar (architecture, preprocessing
contract, data manifest hashes, training record). Loading needs only these two files, and no
pickle: the sidecar rebuilds the module through the encoder registry."""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from medfm.io import get_fs, is_remote, join, save_safetensors, sha256_file, write_json

from . import ENCODERS, Encoder

FORMAT = "medfm-encoder"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """An export that cannot be loaded: missing file, wrong format, hash or key mismatch."""


def save_module(module: nn.Module, path: str | Path) -> str:
    """Save a state dict as safetensors (shared tensors cloned); returns its sha256."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    return save_safetensors(path, tensors, metadata={"format": FORMAT})


def export_encoder(
    encoder: Encoder,
    out_dir: str | Path,
    *,
    name: str = "encoder",
    preprocessing: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
) -> Path | str:
    """Write `<name>.safetensors`, then `<name>.json` (what loading reads first) into out_dir,
    a local folder or an object-store URL; returns the sidecar path (a URL for a URL)."""
    from medfm import __version__

    weights = f"{name}.safetensors"
    digest = save_module(encoder, join(out_dir, weights))
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medfm_version": __version__,
        "architecture": encoder.describe(),
        "embed_dim": encoder.embed_dim,
        "preprocessing": preprocessing,
        "data": data,
        "training": training,
        "weights": {"file": weights, "sha256": digest},
    }
    path = join(out_dir, f"{name}.json")
    write_json(path, sidecar, indent=1, sort_keys=True)
    return path if is_remote(path) else Path(path)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ExportError(f"{path}: sidecar not found") from e
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: sidecar is not JSON ({e})") from e
    if sidecar.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} sidecar (format={sidecar.get('format')!r})")
    if sidecar.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {sidecar['format_version']} is newer than this medfm "
            f"supports ({FORMAT_VERSION})"
        )
    return sidecar


def weights_name(path: str | Path, sidecar: dict[str, Any]) -> str:
    """The weights file a sidecar names: a plain file name beside it, since a path would let a
    sidecar probe or read files outside the export."""
    name = sidecar["weights"]["file"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ExportError(f"{Path(path).name}: weights.file must be a file name in the export")
    return name


def load_encoder(path: str | Path, map_location: str = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an exported encoder from its sidecar (`.json`, a local path or an object-store
    URL) and safetensors weights."""
    if is_remote(path):  # both files copied to a temporary folder, checked there like any export
        fs, where = get_fs(str(path))
        with tempfile.TemporaryDirectory(prefix="medfm-encoder-") as tmp:
            local = Path(tmp) / posixpath.basename(where)
            fs.get_file(where, str(local))
            name = weights_name(local, read_sidecar(local))
            if fs.exists(f"{posixpath.dirname(where)}/{name}"):
                fs.get_file(f"{posixpath.dirname(where)}/{name}", str(local.parent / name))
            return load_encoder(local, map_location)
    path = Path(path)
    sidecar = read_sidecar(path)
    weights = path.parent / weights_name(path, sidecar)
    if not weights.exists():
        raise ExportError(f"{weights}: weights file named by {path.name} is missing")
    if sha256_file(weights)[0] != sidecar["weights"]["sha256"]:
        raise ExportError(f"{weights}: sha256 does not match {path.name} (corrupt or replaced)")
    arch = sidecar["architecture"]
    encoder = ENCODERS.build(arch["name"], arch["params"], where=f"{path.name}:architecture")
    try:
        state = load_file(str(weights), device=map_location)
    except SafetensorError as e:  # a corrupt header that still matches the recorded sha256
        raise ExportError(f"{weights.name}: not a readable safetensors file ({e})") from e
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{weights}: weights do not fit {arch['name']} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return encoder.eval(), sidecar
