"""Deterministic sample order for one epoch, split by rank and by DataLoader worker.

Every process computes the same global order from (seed, epoch) alone, so nothing has to be
communicated: rank r takes a contiguous block (which keeps shard locality), and inside a rank
whole batches go round-robin to workers, which is exactly the order in which DataLoader collects
them. A rank's position is therefore one number, the samples it has consumed, and resuming is
"skip that many" - also after a world-size change (see `remaining_for_rank`).
"""

from __future__ import annotations

import numpy as np

ORDER_SALT = 0x5EED  # separates the order stream from per-sample augmentation streams


def buffer_shuffle(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of `buffer_size` would emit `stream` in.

    Same semantics as WebDataset's `shuffle(n)`: fill the buffer, then repeatedly emit a random
    element and put the next incoming one in its place. Bounded, so reads stay shard-local.
    """
    n = len(stream)
    if buffer_size <= 1 or n <= 1:
        return stream.copy()
    draws = rng.random(n)
    buf = list(stream[: min(buffer_size, n)])
    out = np.empty(n, dtype=stream.dtype)
    nxt = len(buf)
    for i in range(n):
        j = int(draws[i] * len(buf))
        out[i] = buf[j]
        if nxt < n:
            buf[j] = stream[nxt]
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


def epoch_order(
    groups: list[np.ndarray], *, seed: int, epoch: int, shuffle: bool, buffer_size: int
) -> np.ndarray:
    """Global order of unit ids: groups (shards) shuffled, then units through a bounded buffer."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    if not shuffle:
        return np.concatenate(groups)
    rng = np.random.default_rng([seed, epoch, ORDER_SALT])
    stream = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
    return buffer_shuffle(stream, buffer_size, rng)


def per_rank(n: int, world: int, drop_last: bool) -> int:
    """Samples every rank yields: equal on all ranks, so DDP never waits on a missing batch."""
    return n // world if drop_last else -(-n // world)


def rank_block(order: np.ndarray, rank: int, world: int, drop_last: bool) -> np.ndarray:
    """Rank `rank`'s contiguous block; padded by wrapping around (like DistributedSampler)."""
    per = per_rank(len(order), world, drop_last)
    if per == 0:
        return order[:0]
    padded = np.resize(order, per * world)  # np.resize repeats the array cyclically
    return padded[rank * per : (rank + 1) * per]


def remaining_for_rank(
    order: np.ndarray,
    rank: int,
    world: int,
    drop_last: bool,
    consumed: int,
    saved_world: int,
) -> np.ndarray:
    """What rank `rank` still has to yield this epoch after each of `saved_world` ranks consumed
    `consumed` samples.

    Same world size: the tail of the rank's own block (same order as the uninterrupted run).
    Different world size (elastic): every unconsumed unit of the epoch exactly once, re-split
    into contiguous blocks for the new world; the order then differs from an uninterrupted run.
    """
    if saved_world == world:
        return rank_block(order, rank, world, drop_last)[consumed:]
    done = np.concatenate(
        [rank_block(order, r, saved_world, drop_last)[:consumed] for r in range(saved_world)]
    )
    left = order[~np.isin(order, done)]
    return rank_block(left, rank, world, drop_last)


def worker_positions(n: int, batch_size: int, worker: int, num_workers: int) -> np.ndarray:
    """Positions of a rank sequence of length n that `worker` yields: batches w, w+W, w+2W...

    DataLoader takes batches from workers round-robin starting at worker 0, so the batches come
    out in sequence order.
    """
    pos = np.arange(n)
    return pos[(pos // batch_size) % num_workers == worker]
