"""ShardDataLoader: a DataLoader that knows its position in the epoch, for exact resume.

The position is counted here, in the main process, as samples handed to the consumer - not in
the workers, which run ahead by their prefetch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

from .batchring import BatchRing, DeferredTensor
from .planned import PlannedDataset


def common_entries(items: list[dict[str, Any]]) -> Iterator[tuple[str, list]]:
    """(key, values) of the entries every item has; the others are left out of the batch."""
    for k in items[0]:
        if all(k in it for it in items):
            yield k, [it[k] for it in items]


def stackable_entries(items: list[dict[str, Any]]) -> list[tuple[str, list]]:
    """The batch entries that stack into one tensor: same-shaped, same-typed tensors, or ints."""
    out = []
    for k, vals in common_entries(items):
        first = vals[0]
        if isinstance(first, (torch.Tensor, DeferredTensor)):
            same = (isinstance(v, type(first)) and v.shape == first.shape for v in vals)
            if all(same) and all(v.dtype == first.dtype for v in vals):
                out.append((k, vals))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out.append((k, vals))
    return out


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped tensors and ints; keep keys, meta dicts and ragged tensors as lists."""
    out: dict[str, Any] = {}
    for k, entry in common_entries(items):
        vals = [v.tensor() if isinstance(v, DeferredTensor) else v for v in entry]
        first = vals[0]
        if isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in vals):
            # default_collate stacks straight into shared memory inside a worker (one copy less)
            out[k] = default_collate(vals)
        elif isinstance(first, int) and not isinstance(first, bool):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def _defer_in_worker(user_init: Callable[[int], None] | None, worker_id: int) -> None:
    get_worker_info().dataset.defer_conversions()
    if user_init is not None:
        user_init(worker_id)


def batch_length(batch: Any, default: int) -> int:
    if isinstance(batch, dict) and isinstance(batch.get("key"), list):
        return len(batch["key"])
    return default


class ShardDataLoader(DataLoader):
    """DataLoader over a ShardDataset or MixedDataset with `state_dict`/`load_state_dict`.

    Batches are formed inside workers from whole, consecutive slices of the rank's sample order
    and collected round-robin, so the batches come out in the planned order whatever the number
    of workers; resuming skips exactly the samples already consumed. With the default collate
    function and `reuse_buffers`, workers stack batches into reused shared-memory arenas
    (batchring.py) instead of a new segment per tensor per batch.
    """

    def __init__(
        self,
        dataset: PlannedDataset,
        batch_size: int = 1,
        *,
        num_workers: int = 0,
        collate_fn: Callable[[list], Any] = collate_samples,
        pin_memory: bool = False,
        drop_last: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        reuse_buffers: bool = True,
        **kwargs: Any,
    ):
        if not isinstance(dataset, PlannedDataset):
            raise TypeError("ShardDataLoader needs a ShardDataset or MixedDataset")
        dataset.batch_size = batch_size
        reuse = reuse_buffers and num_workers > 0 and collate_fn is collate_samples
        if reuse:  # only this loader's workers hand the ring deferred pixels
            kwargs["worker_init_fn"] = partial(_defer_in_worker, kwargs.get("worker_init_fn"))
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            **kwargs,
        )
        self._offset, self._delivered, self._active = 0, 0, False
        # Arenas per worker: the batches it may have in flight (prefetch) plus two the
        # consumer may still hold; beyond that a worker collates the ordinary way.
        self._ring_slots = (prefetch_factor or 2) + 2 if reuse else 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        ds.start_pass()
        ds._loader_armed = self.num_workers == 0  # dataset.__iter__ runs here: don't re-start
        if self._ring_slots and (not self.persistent_workers or self._iterator is None):
            # New workers get a new ring, so a batch kept from the last pass stays intact
            self.collate_fn = BatchRing(
                collate_samples, stackable_entries, self.num_workers, self._ring_slots
            )
        self._offset, self._delivered, self._active = ds.consumed, 0, True
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._delivered += batch_length(batch, self.batch_size or 1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch and samples consumed by this rank; resume with `load_state_dict`."""
        state = self.dataset.state_dict()
        if self._active:
            state["consumed"] = self._offset + self._delivered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._active = False
