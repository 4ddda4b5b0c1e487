"""Encoders for every modality behind one registry. Build one with
`ENCODERS.build(name, params)` or `build_encoder({"name": ..., **params})`."""

from typing import Any

from . import ehr, signal, timm2d, vit2d, vit3d  # noqa: F401  (registers the encoders)
from .base import SIZES, Encoder
from .registry import ENCODERS


def build_encoder(spec: dict[str, Any], where: str = "model") -> Encoder:
    params = dict(spec)
    return ENCODERS.build(params.pop("name", ""), params, where=where)


__all__ = ["ENCODERS", "SIZES", "Encoder", "build_encoder"]
