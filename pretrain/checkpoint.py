"""Checkpoint files: atomic writes, one pickle-free read per resume, and refusal to resume a
different run.

Every checkpoint a run reads goes through `load_checkpoint` (`torch.load(weights_only=True)`,
which cannot run code). `--resume` reads the newest complete checkpoint once, checks it belongs
to this config, and hands that same state to Lightning (`SafeCheckpointIO(preloaded=...)`), so
there is no second read of a file that may have changed in between. FSDP's own restore would
unpickle the file (`_lazy_load`, bypassing the checkpoint IO); `SafeFSDPStrategy` routes it
through the checkpoint IO as well.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp

from medfm.io import atomic_open, get_fs, remove_temporaries

from .config import PretrainConfig

LAST = "last.ckpt"
log = logging.getLogger("medfm.pretrain")


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (different config, missing file)."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary name and renames (a kill mid-write leaves the previous checkpoint
    intact), and loads with `weights_only=True`: a checkpoint never runs code when opened.
    `preloaded` maps a path to the state `resume_checkpoint` already read from it."""

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        self.preloaded = {os.path.abspath(k): v for k, v in (preloaded or {}).items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # Local paths and fsspec URLs alike; remote stores get their storage options.
        with atomic_open(*get_fs(str(path), **(storage_options or {}))) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        state = self.preloaded.pop(os.path.abspath(str(path)), None)
        return state if state is not None else load_checkpoint(path)


class SafeFSDPStrategy(FSDPStrategy):
    """FSDP that restores full checkpoints through its checkpoint IO, never by unpickling.

    Lightning's FSDP restore reads the file with `_lazy_load`, an unpickler, and ignores the
    checkpoint IO. The rest of its restore (sharding the weights, re-keying optimizer state) is
    kept: only the read is replaced, for this call. Sharded checkpoint folders are refused, since
    their metadata is pickled too (medfm writes full-state checkpoints)."""

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise ResumeError(f"{path}: not a full-state checkpoint file; refusing to load it")
        state = self.checkpoint_io.load_checkpoint(path)
        with _reads_as(state):
            return super().load_checkpoint(path, weights_only=True)


@contextmanager
def _reads_as(state: dict[str, Any]) -> Iterator[None]:
    """Lightning's FSDP module reads a full checkpoint with `_lazy_load(path)`: answer with
    `state`, already read safely, for the duration of one restore."""
    if not hasattr(lightning_fsdp, "_lazy_load"):  # a Lightning that reads differently: stop
        raise ResumeError("this Lightning version's FSDP restore is not known to be safe")
    original = lightning_fsdp._lazy_load
    lightning_fsdp._lazy_load = lambda _path: state
    try:
        yield
    finally:
        lightning_fsdp._lazy_load = original


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


def newest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint with the most steps, of any name, read once (None if none).

    Checkpoints are written under a temporary name and renamed, so every `*.ckpt` is whole; a
    kill during the first `last.ckpt` write leaves `step*.ckpt` and a temporary, which is
    removed here. A `*.ckpt` that does not load safely is an error, not skipped: it is corrupt
    or was tampered with."""
    if not folder.is_dir():
        return None
    for tmp in remove_temporaries(*get_fs(str(folder))):
        log.warning("removed the unfinished checkpoint write %s", tmp)
    best: tuple[tuple[int, bool], Path, dict[str, Any]] | None = None
    for path in sorted(folder.glob("*.ckpt")):
        state = load_checkpoint(path)
        key = (int(state.get("global_step", -1)), path.name == LAST)  # a tie: last.ckpt
        if best is None or key > best[0]:
            best = (key, path, state)
    return None if best is None else (best[1], best[2])


def resume_checkpoint(cfg: PretrainConfig, force: bool) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume `cfg` from and its state; refuses one of a different config."""
    found = newest_checkpoint(checkpoint_dir(cfg))
    if found is None:
        raise ResumeError(
            f"--resume: no checkpoint in {checkpoint_dir(cfg)} (has this run saved one yet?)"
        )
    path, state = found
    meta = state.get("medfm")
    if meta is None:
        raise ResumeError(f"{path}: has no medfm run record; it was not written by medfm pretrain")
    if meta["fingerprint"] != cfg.fingerprint() and not force:
        changes = _diff(meta["config"], cfg.to_dict())
        raise ResumeError(
            f"{path} was written by a different config; refusing to resume (use --force-resume "
            f"to override). Changed: {'; '.join(changes[:8]) or 'ignored fields only'}"
        )
    return path, state
