"""Checkpoint files: atomic writes, pickle-free loading, and refusal to resume a different run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medfm.io import atomic_open, get_fs

from .config import PretrainConfig

LAST = "last.ckpt"


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (different config, missing file)."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary name and renames (a kill mid-write leaves the previous checkpoint
    intact), and loads with `weights_only=True`: a checkpoint never runs code when opened."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # Local paths and fsspec URLs alike; remote stores get their storage options.
        with atomic_open(*get_fs(str(path), **(storage_options or {}))) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ResumeError(
            f"{path}: not a loadable medfm checkpoint ({type(e).__name__}: {e})"
        ) from e


def checkpoint_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where}: {json.dumps(a)} -> {json.dumps(b)}"]


def resume_path(cfg: PretrainConfig, force: bool) -> Path:
    """The checkpoint to resume `cfg` from; refuses one written by a different config."""
    path = checkpoint_dir(cfg) / LAST
    if not path.exists():
        raise ResumeError(f"--resume: no checkpoint at {path} (has this run saved one yet?)")
    meta = load_checkpoint(path).get("medfm")
    if meta is None:
        raise ResumeError(f"{path}: has no medfm run record; it was not written by medfm pretrain")
    if meta["fingerprint"] != cfg.fingerprint() and not force:
        changes = _diff(meta["config"], cfg.to_dict())
        raise ResumeError(
            f"{path} was written by a different config; refusing to resume (use --force-resume "
            f"to override). Changed: {'; '.join(changes[:8]) or 'ignored fields only'}"
        )
    return path
