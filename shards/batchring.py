"""Reused shared-memory batch buffers between DataLoader workers and the main process.

PyTorch's DataLoader moves every tensor of every batch through a fresh shared-memory segment,
handed over as a file descriptor over a socket (a round trip to a thread in the worker). For
decoded images that costs more than the collation: the worker page-faults the whole new
segment in (~280 us per 256x256 float image here), and each hand-over wakes a thread that
fights the decoder for the GIL. A `BatchRing` gives each worker a few arenas instead. A worker
stacks a batch's tensors into a free arena, and the main process maps each arena once and
hands out tensors that alias it. The arena stays leased for as long as any of those tensors
(or a view of them) is alive, so a batch the consumer keeps is never overwritten; a worker with
no free arena collates the ordinary way.
"""

from __future__ import annotations

import math
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from medfm.compat import shared_storage

ALIGN = 64  # byte alignment of each tensor inside an arena
GROWTH = 1.25  # an arena that is too small is replaced by one with this much headroom

_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()


class DeferredTensor:
    """A sample entry whose last conversion is left to collation, which writes it straight into
    the batch (one pass over the memory instead of converting, then stacking)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def write(self, out: torch.Tensor) -> None:
        raise NotImplementedError

    def tensor(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.write(out)
        return out


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class BatchRing:
    """A collate function for DataLoader workers that stacks into reused per-worker arenas.

    `stackable(items)` names the batch entries to stack: `(key, values)` pairs of same-shaped
    tensors, DeferredTensors or ints. `collate(items)` builds the rest of the batch, or all of
    it when no arena is free. Make a new ring for each new set of workers, so that the leases
    of an old ring's batches cannot free a slot that new workers use.
    """

    def __init__(
        self,
        collate: Callable[[list], dict[str, Any]],
        stackable: Callable[[list], list[tuple[str, list]]],
        workers: int,
        slots: int,
    ):
        self.collate, self.stackable = collate, stackable
        self.id = uuid.uuid4().hex
        self._free = torch.ones(workers, slots, dtype=torch.uint8).share_memory_()
        self._arenas: dict[int, torch.Tensor] = {}  # worker side, by slot
        self._mapped: dict[tuple[int, int], np.ndarray] = {}  # main side, by (worker, slot)
        _RINGS[self.id] = self

    def __getstate__(self) -> dict[str, Any]:  # spawned workers get the shared flags only
        return {**self.__dict__, "_arenas": {}, "_mapped": {}}

    # --- worker side -----------------------------------------------------------------------
    def __call__(self, items: list) -> Any:
        info = get_worker_info()
        planned = self.stackable(items) if info is not None else []
        refs, nbytes = _layout(planned)
        slot = self._acquire(info.id) if nbytes else None
        if slot is None:
            return self.collate(items)
        arena, fresh = self._arena(slot, nbytes)
        for (_, off, shape, dtype), (_, vals) in zip(refs, planned, strict=True):
            out = arena[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            if isinstance(vals[0], DeferredTensor):
                for v, row in zip(vals, out, strict=True):
                    v.write(row)
            elif isinstance(vals[0], torch.Tensor):
                torch.stack(vals, out=out)
            else:
                out.copy_(torch.as_tensor(vals, dtype=dtype))
        done = {key for key, _ in planned}
        rest = self.collate([{k: v for k, v in it.items() if k not in done} for it in items])
        return _LeasedBatch(self.id, info.id, slot, arena if fresh else None, refs, rest)

    def _acquire(self, worker: int) -> int | None:
        row = self._free[worker].numpy()
        free = np.flatnonzero(row)
        if len(free) == 0:
            return None  # the consumer still holds every arena of this worker
        row[free[0]] = 0
        return int(free[0])

    def _arena(self, slot: int, nbytes: int) -> tuple[torch.Tensor, bool]:
        """(arena, fresh): this slot's arena, replaced by a larger one when too small. A fresh
        arena travels with its first batch, and the main process keeps it mapped."""
        if slot in self._arenas and self._arenas[slot].numel() >= nbytes:
            return self._arenas[slot], False
        # Allocated in shared memory directly: share_memory_() would copy a private buffer
        storage = shared_storage(_aligned(int(nbytes * GROWTH)))
        self._arenas[slot] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self._arenas[slot], True

    # --- main side -------------------------------------------------------------------------
    def lease(self, worker: int, slot: int, arena, refs, rest) -> dict[str, Any]:
        """The batch with its stacked entries as tensors aliasing the arena."""
        if arena is not None:  # first batch in a new arena: keep it mapped for the ring's life
            self._mapped[(worker, slot)] = arena.numpy()
        # A worker's batches arrive in the order it sent them, so its newest arena is mapped.
        base = self._mapped[(worker, slot)]
        # One fresh ndarray per batch: every tensor below holds it, and when the last of them
        # (or of their views) is gone, its finalizer hands the arena back to the worker.
        holder = base[:]
        weakref.finalize(holder, _release, self._free.numpy(), worker, slot)
        for key, off, shape, dtype in refs:
            count = math.prod(shape)
            if count == 0:  # frombuffer refuses empty views; nothing to alias
                rest[key] = torch.empty(shape, dtype=dtype)
                continue
            rest[key] = torch.frombuffer(holder, dtype=dtype, count=count, offset=off).view(shape)
        return rest


def _layout(planned: list[tuple[str, list]]) -> tuple[list[tuple], int]:
    """Where each stacked entry goes in an arena: [(key, offset, shape, dtype)], bytes used."""
    refs, end = [], 0
    for key, vals in planned:
        first = vals[0] if isinstance(vals[0], DeferredTensor) else torch.as_tensor(vals[0])
        shape = (len(vals), *first.shape)
        refs.append((key, end, shape, first.dtype))
        end = _aligned(end + math.prod(shape) * first.dtype.itemsize)
    return refs, end


def _release(free: np.ndarray, worker: int, slot: int) -> None:
    free[worker, slot] = 1


class _LeasedBatch:
    """What a worker sends: descriptors into an arena; unpickles, in the main process, as the
    batch itself."""

    def __init__(self, ring: str, worker: int, slot: int, arena, refs, rest):
        self.args = (ring, worker, slot, arena, refs, rest)

    def __reduce__(self):
        return _unpack, self.args


def _unpack(ring: str, *args: Any) -> dict[str, Any]:
    return _RINGS[ring].lease(*args)
