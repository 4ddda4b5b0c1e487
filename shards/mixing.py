"""MixedDataset: draw from several sources in given proportions, deterministically and resumably.

The mix of an epoch is planned up front from (seed, epoch, rank): position p of the rank's
sequence comes from source src[p], at position pos[p] of that source's own (rank-local) order.
Sources are read by position rather than iterated, so the mixer - not each source - decides
which worker loads what, and the position of the whole mixture is again one number.

- mode="exhaust": every source's epoch is used exactly once; while several sources still have
  samples, each draw picks one with probability proportional to its weight among those left.
- mode="resample": `samples_per_epoch` draws with the given probabilities; a source that runs
  out starts a fresh pass (new order) of itself, so small sources are repeated, large ones
  sub-sampled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .planned import PlannedDataset

MODES = ("resample", "exhaust")
MIX_SALT = 0x313C
PASSES_PER_EPOCH = 1_000_000  # source epochs used by one mixer epoch in resample mode


class MixedDataset(PlannedDataset):
    """Mix ShardDatasets (or nested MixedDatasets); each item records item["source"]."""

    def __init__(
        self,
        sources: Mapping[PlannedDataset, float],
        *,
        seed: int = 0,
        mode: str = "resample",
        samples_per_epoch: int | None = None,
        names: Sequence[str] | None = None,
        on_error: str = "raise",
        max_skips: int = 10,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.sources = list(sources)
        for s in self.sources:
            if not isinstance(s, PlannedDataset):
                raise TypeError(
                    f"{type(s).__name__} cannot be mixed: sources must be ShardDataset or "
                    "MixedDataset, which can be read by position (needed for exact resume)"
                )
        weights = np.array([float(sources[s]) for s in self.sources])
        if len(weights) == 0 or (weights <= 0).any() or not np.isfinite(weights).all():
            raise ValueError("MixedDataset needs at least one source, all weights positive")
        self.weights = weights / weights.sum()
        self.names = (
            list(names) if names else [self._name(s, i) for i, s in enumerate(self.sources)]
        )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"source names must be unique, got {self.names}")
        first = self.sources[0]
        super().__init__(
            seed=seed,
            drop_last=False,
            rank=first._rank,
            world_size=first._world,
            on_error=on_error,
            max_skips=max_skips,
        )
        self.mode, self.samples_per_epoch = mode, samples_per_epoch
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._source_orders: dict[tuple[int, int], np.ndarray] = {}

    @staticmethod
    def _name(source: Any, i: int) -> str:
        return getattr(source, "name", None) or f"source{i}"

    # --- planning -------------------------------------------------------------------------
    def num_units(self) -> int:
        if self.mode == "exhaust":
            return sum(s.rank_length() for s in self.sources)
        return self.samples_per_epoch or sum(s.rank_length() for s in self.sources)

    def rank_length(self) -> int:
        return self.num_units()

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, source epoch, position in that source's order) for every position."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch, self.rank, MIX_SALT])
            lengths = np.array([s.rank_length() for s in self.sources])
            if self.mode == "exhaust":
                src = self._exhaust_choices(lengths, rng)
            else:
                src = rng.choice(len(self.sources), size=self.num_units(), p=self.weights)
            draw = np.zeros(len(src), dtype=np.int64)
            for s in range(len(self.sources)):
                mask = src == s
                draw[mask] = np.arange(mask.sum())  # k-th draw of source s
            length = lengths[src].clip(min=1)
            src_epoch = np.full(len(src), epoch, dtype=np.int64)
            if self.mode == "resample":
                src_epoch = epoch * PASSES_PER_EPOCH + draw // length
            self._plans = {epoch: (src, src_epoch, draw % length)}  # keep one epoch's plan
        return self._plans[epoch]

    def _exhaust_choices(self, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        left = lengths.astype(np.int64).copy()
        out = np.empty(int(left.sum()), dtype=np.int64)
        draws = rng.random(len(out))
        for i in range(len(out)):
            p = self.weights * (left > 0)
            s = int(np.searchsorted(np.cumsum(p / p.sum()), draws[i], side="right"))
            s = min(s, len(left) - 1)
            out[i] = s
            left[s] -= 1
        return out

    def rank_sequence(self, epoch: int, consumed: int = 0, saved_world: int | None = None):
        if saved_world is not None and saved_world != self.world_size:
            raise ValueError(
                f"MixedDataset cannot resume mid-epoch on {self.world_size} ranks from a state "
                f"saved on {saved_world}; resume from an end-of-epoch checkpoint instead"
            )
        return np.arange(consumed, self.num_units())

    def _source_order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._source_orders:
            if len(self._source_orders) > 4 * len(self.sources):
                self._source_orders.clear()
            self._source_orders[key] = self.sources[s].rank_sequence(epoch)
        return self._source_orders[key]

    def defer_conversions(self) -> None:
        super().defer_conversions()
        for s in self.sources:
            s.defer_conversions()

    def prepare(self, units: np.ndarray, epoch: int) -> None:
        src, src_epoch, pos = self.plan(epoch)
        for s, e in {(int(a), int(b)) for a, b in zip(src[units], src_epoch[units], strict=True)}:
            mine = units[(src[units] == s) & (src_epoch[units] == e)]
            self.sources[s].prepare(self._source_order(s, e)[pos[mine]], e)

    def load(self, unit: int, epoch: int) -> dict[str, Any]:
        src, src_epoch, pos = self.plan(epoch)
        s, e = int(src[unit]), int(src_epoch[unit])
        item = self.sources[s].load(int(self._source_order(s, e)[pos[unit]]), e)
        item["source"] = self.names[s]
        return item


class RealizedRatio:
    """The share of synthetic samples a run actually trained on, for its log: the mix is drawn
    at random, so the realized share is checked against a binomial tolerance of the target."""

    def __init__(self, target: float):
        self.target, self.synthetic, self.total = target, 0, 0

    def update(self, flags: Iterable[bool]) -> float:
        """Count one batch by its samples' synthetic flags; returns the share so far."""
        flags = [bool(f) for f in flags]
        self.synthetic += sum(flags)
        self.total += len(flags)
        return self.ratio

    @property
    def ratio(self) -> float:
        return self.synthetic / self.total if self.total else 0.0

    def tolerance(self, z: float = 4.0) -> float:
        """z binomial standard errors of the share at the draws seen so far."""
        return z * math.sqrt(self.target * (1 - self.target) / max(self.total, 1))

    def within_tolerance(self, z: float = 4.0) -> bool:
        return abs(self.ratio - self.target) <= self.tolerance(z)

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "realized": self.ratio,
            "samples": self.total,
            "tolerance": self.tolerance(),
            "within_tolerance": self.within_tolerance(),
        }
