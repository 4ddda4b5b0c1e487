"""The machinery shared by ShardDataset and MixedDataset: epochs, rank/worker split, resume, skips.

A subclass says how many units (samples or patches) an epoch has on this rank
(`rank_sequence`) and how to load one (`load`); this base turns that into an IterableDataset
whose position is a single count of consumed samples per rank.

Epoch and resume offset live in a small shared-memory tensor, so DataLoader workers - also
persistent ones, which keep their own copy of the dataset - see `set_epoch` and
`load_state_dict` made in the main process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import ShardError
from .order import worker_positions

log = logging.getLogger("medfm.shards")

EPOCH, OFFSET, SAVED_WORLD = 0, 1, 2  # slots of the shared control tensor
ON_ERROR = ("raise", "skip")
PREPARE_AHEAD = 256  # units whose rows are fetched together


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def item_seed(seed: int, epoch: int, unit: int) -> int:
    """Seed for one sample's random choices (patch position, augmentation): resume-exact."""
    return int(np.random.SeedSequence([seed, epoch, unit]).generate_state(1)[0])


class PlannedDataset(IterableDataset):
    """Base class; see the module docstring."""

    def __init__(
        self,
        *,
        seed: int,
        drop_last: bool,
        rank: int | None,
        world_size: int | None,
        on_error: str,
        max_skips: int,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.seed, self.drop_last = int(seed), drop_last
        self._rank, self._world = rank, world_size
        self.on_error, self.max_skips = on_error, max_skips
        self.batch_size = 1  # set by ShardDataLoader so worker batches line up with its batches
        self._control = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._epoch, self._started, self._pending = 0, False, None
        self._loader_armed = False
        self.consumed = 0  # counted only when iterated without DataLoader workers
        self.deferred = False  # items may hold DeferredTensors (only in a ShardDataLoader worker)

    # --- what subclasses provide ---------------------------------------------------------
    def num_units(self) -> int:
        raise NotImplementedError

    def rank_sequence(self, epoch: int, consumed: int = 0, saved_world: int | None = None):
        """Units this rank yields in `epoch`, after skipping `consumed` (see order.py)."""
        raise NotImplementedError

    def load(self, unit: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, units: np.ndarray, epoch: int) -> None:
        """Called with each next stretch of units before they load, to fetch what they need
        in one go (ShardDataset converts their manifest rows)."""

    def defer_conversions(self) -> None:
        """Let items carry DeferredTensors, for a collate function that writes them into the
        batch (ShardDataLoader calls this in its own workers)."""
        self.deferred = True

    # --- distribution ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else dist_rank_world()[0]

    @property
    def world_size(self) -> int:
        return self._world if self._world is not None else dist_rank_world()[1]

    def rank_length(self) -> int:
        """Samples per epoch on this rank (equal on every rank)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.rank_length()

    # --- epochs and resume ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next pass (a pending resume of another epoch is dropped)."""
        if self._pending is not None and self._pending[0] != epoch:
            self._pending = None
        self._epoch, self._started = int(epoch), False

    def start_pass(self) -> None:
        """Decide (epoch, offset) of the next pass in the main process and publish it.

        A fresh dataset starts at its set epoch; each further pass is the next epoch (as with
        LitData); a loaded state resumes its epoch at its offset.
        """
        saved_world = self.world_size
        if self._pending is not None:
            epoch, offset, saved_world = self._pending
            self._pending = None
        else:
            epoch, offset = (self._epoch + 1 if self._started else self._epoch), 0
        self._epoch, self._started, self.consumed = epoch, True, offset
        self._control[EPOCH], self._control[OFFSET] = epoch, offset
        self._control[SAVED_WORLD] = saved_world

    def state_dict(self) -> dict[str, Any]:
        """Position: epoch and samples this rank has consumed in it."""
        if self._pending is not None:
            epoch, consumed, world = self._pending
        else:
            epoch, consumed = self._epoch, (int(self.consumed) if self._started else 0)
            world = self.world_size
        return {
            "epoch": epoch,
            "consumed": consumed,
            "world_size": world,
            "seed": self.seed,
            "units": self.num_units(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`; the next pass yields the rest of its epoch exactly once."""
        if state.get("units", self.num_units()) != self.num_units() or state.get(
            "seed", self.seed
        ) != int(self.seed):
            raise ValueError(
                f"cannot resume: state was saved for {state.get('units')} units with seed "
                f"{state.get('seed')}, this dataset has {self.num_units()} with seed {self.seed}"
            )
        epoch, consumed, world = (
            int(state["epoch"]),
            int(state["consumed"]),
            int(state["world_size"]),
        )
        if world == self.world_size and consumed >= self.rank_length():
            epoch, consumed = epoch + 1, 0  # saved at the very end of an epoch
        self._pending = (epoch, consumed, world)
        self._epoch, self._started = epoch, False

    # --- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None and not self._loader_armed:
            self.start_pass()
        self._loader_armed = False
        epoch, offset, saved_world = (int(v) for v in self._control)
        seq = self.rank_sequence(epoch, offset, saved_world or None)  # 0: never published
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        units = seq[worker_positions(len(seq), self.batch_size, worker, workers)]
        for item in self._load_all(units, epoch):
            if info is None:
                self.consumed += 1
            yield item

    def _load_all(self, units: np.ndarray, epoch: int) -> Iterator[dict[str, Any]]:
        skipped = 0
        for i, unit in enumerate(units):
            if i % PREPARE_AHEAD == 0:
                self.prepare(units[i : i + PREPARE_AHEAD], epoch)
            try:
                item = self.load(int(unit), epoch)
            except ShardError as e:
                if self.on_error == "raise":
                    raise
                skipped += 1
                if skipped > self.max_skips:
                    raise ShardError(
                        f"more than max_skips={self.max_skips} bad samples in one worker; last: {e}"
                    ) from e
                log.warning("skipped bad sample (%d of at most %d): %s", skipped, self.max_skips, e)
                item = self._substitute(units, i, epoch)
            yield item

    def _substitute(self, units: np.ndarray, i: int, epoch: int) -> dict[str, Any]:
        """Replace a skipped sample by the next loadable one of this worker, so every rank keeps
        yielding the same number of batches (a shorter rank would hang DDP)."""
        for j in range(1, len(units)):
            try:
                item = self.load(int(units[(i + j) % len(units)]), epoch)
            except ShardError:
                continue
            item["meta"]["substituted"] = True
            return item
        raise ShardError("every sample of this worker failed to load")
