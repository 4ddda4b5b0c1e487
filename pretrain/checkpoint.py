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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp

from medfm.config import ConfigError
from medfm.io import (
    as_url,
    atomic_open,
    get_fs,
    is_local,
    is_remote,
    join,
    put_tree,
    remove_temporaries,
)

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
        self.preloaded = {_key(k): v for k, v in (preloaded or {}).items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # Local paths and fsspec URLs alike; remote stores get their storage options.
        with atomic_open(*get_fs(str(path), **(storage_options or {}))) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        state = self.preloaded.pop(_key(path), None)
        return state if state is not None else load_checkpoint(path)


def _key(path: str | os.PathLike) -> str:
    """One spelling per file: an absolute local path, or the URL with its protocol."""
    return as_url(*get_fs(os.fspath(path)))


class SafeFSDPStrategy(FSDPStrategy):
    """FSDP that restores full checkpoints through its checkpoint IO, never by unpickling.

    Lightning's FSDP restore reads the file with `_lazy_load`, an unpickler, and ignores the
    checkpoint IO. The rest of its restore (sharding the weights, re-keying optimizer state) is
    kept: only the read is replaced, for this call. Sharded checkpoint folders are refused, since
    their metadata is pickled too (medfm writes full-state checkpoints)."""

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        path = str(self.broadcast(checkpoint_path))
        fs, where = get_fs(path)
        if not fs.isfile(where):
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
    """A checkpoint file or URL, read with `weights_only=True` (no code runs)."""
    fs, where = get_fs(str(path))
    try:
        if is_local(fs):
            return torch.load(where, map_location="cpu", weights_only=True)
        with fs.open(where, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ResumeError(
            f"{path}: not a loadable medfm checkpoint ({type(e).__name__}: {e})"
        ) from e


def checkpoint_dir(cfg: PretrainConfig) -> Path | str:
    """out_dir/checkpoints: a Path for a local out_dir, the URL on the object store it names."""
    return _local_or_url(join(cfg.out_dir, "checkpoints"))


def _local_or_url(where: str) -> Path | str:
    return where if is_remote(where) else Path(where)


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where}: {json.dumps(a)} -> {json.dumps(b)}"]


def newest_checkpoint(folder: str | Path) -> tuple[Path | str, dict[str, Any]] | None:
    """The complete checkpoint with the most steps, of any name, read once (None if none).

    Checkpoints are written under a temporary name and renamed, so every `*.ckpt` is whole; a
    kill during the first `last.ckpt` write leaves `step*.ckpt` and a temporary, which is
    removed here. A `*.ckpt` that does not load safely is an error, not skipped: it is corrupt
    or was tampered with."""
    fs, root = get_fs(str(folder))
    if not fs.isdir(root):
        return None
    for tmp in remove_temporaries(fs, root):
        log.warning("removed the unfinished checkpoint write %s", tmp)
    best: tuple[tuple[int, bool], Path | str, dict[str, Any]] | None = None
    local = is_local(fs)
    for path in (Path(p) if local else as_url(fs, p) for p in sorted(fs.glob(f"{root}/*.ckpt"))):
        state = load_checkpoint(path)
        key = (int(state.get("global_step", -1)), str(path).endswith(f"/{LAST}"))  # tie: last
        if best is None or key > best[0]:
            best = (key, path, state)
    return None if best is None else (best[1], best[2])


def resume_checkpoint(cfg: PretrainConfig, force: bool) -> tuple[Path | str, dict[str, Any]]:
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


class StagedOutputs(L.Callback):
    """Where a run's loggers, plots and throughput.json write, and their upload.

    Lightning's CSV logger appends to metrics.csv and TensorBoard to its event files; an object
    store cannot append, and matplotlib and the loggers write plain files. So for an out_dir on
    an object store they write into a local staging folder (`dir`), laid out like out_dir, and
    every file there is uploaded to out_dir (each under a temporary key, then committed) at
    every checkpoint and when `upload` is called at the end. A killed run loses at most what
    it logged since its last checkpoint, which a resume recomputes. For a local out_dir `dir`
    is out_dir itself and nothing is copied. Checkpoints, config.json and the export are
    written to out_dir directly (atomically) either way."""

    def __init__(self, cfg: PretrainConfig):
        self.out_dir = cfg.out_dir
        self.remote = is_remote(cfg.out_dir)
        if self.remote and cfg.train.ledger:
            raise ConfigError(
                "train.ledger: the ledger appends to out_dir/ledger every step, which an object "
                "store cannot do; use a local out_dir for ledger runs"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="medfm-stage-") if self.remote else None
        self.dir = self._tmp.name if self._tmp else cfg.out_dir

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # flush what they buffer (CSV: 100 steps)
                logger.save()
            self.upload()

    def upload(self) -> None:
        if self.remote:
            put_tree(self.dir, self.out_dir)

    def close(self) -> None:
        """Upload a last time and remove the staging folder."""
        self.upload()
        if self._tmp is not None:
            self._tmp.cleanup()
