"""The base encoder: a `medfm pretrain` export (safetensors + JSON sidecar), local or from the hub.

`medfm.models.export.load_encoder` rebuilds it from the sidecar and checks the weights' sha256.
That hash is the encoder's identity: adapters record it and refuse to load onto anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfm.finetune import hub
from medfm.io import get_fs, is_remote, join
from medfm.models import Encoder
from medfm.models.export import FORMAT, load_encoder


class EncoderLoadError(ValueError):
    """A path that does not hold a loadable encoder export."""


@dataclass
class BaseEncoder:
    encoder: Encoder
    uri: str  # what the user gave (path or hub:// reference)
    sha256: str  # of the weights file: the encoder's identity
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    manifests: Any  # the pretraining data record (manifest hashes), as the sidecar has it


def find_sidecar(path: Path, uri: str) -> Path:
    """The sidecar itself, or the one `medfm-encoder` JSON in a folder (encoder.json first)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise EncoderLoadError(f"{uri}: no such encoder file or folder")
    candidates = [path / "encoder.json"] + sorted(path.glob("*.json"))
    for c in candidates:
        if c.is_file() and json.loads(c.read_text()).get("format") == FORMAT:
            return c
    raise EncoderLoadError(
        f"{uri}: no {FORMAT} sidecar JSON in {path}; point at a `medfm pretrain` export folder "
        "(<name>.json + <name>.safetensors) or at its sidecar"
    )


def remote_sidecar(url: str) -> str:
    """The sidecar an object-store URL names: itself, or <folder>/encoder.json."""
    fs, path = get_fs(url)
    if fs.isfile(path):
        return url
    if not fs.isfile(f"{path}/encoder.json"):
        raise EncoderLoadError(f"{url}: no encoder.json there; point at a medfm pretrain export")
    return join(url, "encoder.json")


def load_base_encoder(uri: str) -> BaseEncoder:
    """Load the encoder (path, sidecar path or hub:// reference) with its identity and contract."""
    if not hub.is_hub_uri(uri) and is_remote(uri):
        encoder, sidecar = load_encoder(remote_sidecar(uri))
    else:
        encoder, sidecar = load_encoder(find_sidecar(hub.resolve(uri), str(uri)))
    return BaseEncoder(
        encoder=encoder,
        uri=str(uri),
        sha256=sidecar["weights"]["sha256"],
        architecture=sidecar["architecture"],
        preprocessing=sidecar.get("preprocessing", {}),
        manifests=sidecar.get("data", {}),
    )
