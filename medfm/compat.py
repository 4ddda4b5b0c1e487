"""The one place medfm touches private APIs of torch, zarr and Ray.

Each private call is guarded: when a release moves or drops it, the public fallback below it
runs instead (tests/test_compat.py checks that both give the same result). Nothing else in the
package imports `torch.UntypedStorage._new_shared`, `zarr.core.*` or `ray._private`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


# -- torch: shared-memory storage ------------------------------------------------------------
def shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A storage of `nbytes` in shared memory, allocated there directly (no private copy)."""
    import torch  # here, not at the top: ingest and shards' readers import this module too

    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return shared_storage_public(nbytes)
    return new_shared(nbytes)


def shared_storage_public(nbytes: int) -> torch.UntypedStorage:
    """Public API: a private buffer moved to shared memory (one extra allocation and copy)."""
    import torch

    return torch.UntypedStorage(nbytes).share_memory_()


# -- zarr: Morton order of inner chunks, and running zarr's async store calls ----------------
def morton_order(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The order zarr's sharding codec writes a shard's inner chunks in."""
    try:
        from zarr.core.indexing import morton_order_iter
    except ImportError:
        return morton_order_public(shape)
    return [tuple(int(i) for i in c) for c in morton_order_iter(shape)]


def morton_order_public(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Z-order of a grid of any shape: coordinates sorted by their interleaved bits (axis 0 the
    lowest bit of each group), as zarr defines it; points outside the shape are skipped."""
    bits = max((n - 1).bit_length() for n in shape) if shape else 0

    def code(c: tuple[int, ...]) -> int:
        out = 0
        for bit in range(bits):
            for axis, x in enumerate(c):
                out |= ((x >> bit) & 1) << (bit * len(c) + axis)
        return out

    return sorted(itertools.product(*(range(n) for n in shape)), key=code)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on zarr's event loop (its stores' async sessions are bound to that loop)."""
    try:
        from zarr.core.sync import sync
    except ImportError:
        return run_sync_public(coro)
    return sync(coro)


def run_sync_public(coro: Coroutine[Any, Any, T]) -> T:
    """Public API: a fresh event loop. Fine for local and memory stores; a remote store whose
    session lives on zarr's own loop may need the private path."""
    return asyncio.run(coro)


# -- Ray: which driver jobs are finished ----------------------------------------------------
def ray_jobs_dead() -> dict[str, bool] | None:
    """{job id (hex): finished?} of the connected cluster's driver jobs; None if unknown."""
    try:
        from ray._private import state
    except ImportError:
        return ray_jobs_dead_public()
    return {j["JobID"]: bool(j["IsDead"]) for j in state.jobs()}


def ray_jobs_dead_public() -> dict[str, bool] | None:
    """Public state API (`ray.util.state`); it needs the dashboard, so None without one."""
    try:
        from ray.util.state import list_jobs

        jobs = list_jobs(detail=False, raise_on_missing_output=False)
    except Exception:  # no dashboard / state API: the caller falls back to waiting
        return None
    return {j.job_id: j.status not in ("PENDING", "RUNNING") for j in jobs if j.type == "DRIVER"}


def validate_cluster_config(config: dict[str, Any]) -> None:
    """Ray's own check of a cluster-launcher YAML: defaults filled, then node types validated."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return validate_cluster_config_public(config)
    validate_config(prepare_config(config))


def validate_cluster_config_public(config: dict[str, Any]) -> None:
    """Public fallback: the JSON schema Ray ships (`ray/autoscaler/ray-schema.json`), plus the
    head type naming one of the node types (what Ray's check adds that matters here)."""
    import json
    from pathlib import Path

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config.get("available_node_types", {})
    if types and config.get("head_node_type") not in types:
        raise ValueError(f"head_node_type {config.get('head_node_type')!r} is not in {list(types)}")
