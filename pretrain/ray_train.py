"""`medfm pretrain` and `medfm finetune` run as multi-worker DDP jobs across the nodes of a running
Ray cluster.

`TrainGroup.start()` places one long-lived Ray actor on each node of the connected cluster (the
driver has called `ray.init(address=...)`). `group.pretrain(cfg)` runs the same
`medfm.pretrain.train.run(cfg)` in every actor, as Lightning launched per worker: each actor
gets the rendezvous variables Lightning's own `LightningEnvironment` reads (`MASTER_ADDR` and
`MASTER_PORT` of rank 0's node, `NODE_RANK`, `LOCAL_RANK=0`) and `train.num_nodes` = the group
size, so Lightning starts DDP (gloo on CPU, NCCL on GPU) exactly as under `srun` or `torchrun`;
the ranks read disjoint parts of the shards (medfm.shards splits by rank) and rank 0 writes the
run folder, which must be on storage every node mounts at the same path.

Why not Ray Train's `TorchTrainer` (with `ray.train.lightning.RayDDPStrategy`): it starts a new
controller and worker processes for every `fit`, and an empty `fit` with 2 workers took 65 to
80 s on the 2-core CI box; the demo trains 5 to 7 models in a row, so the group is started once
and reused (docs/clusters.md).

The actors ask Ray for no CPUs (one GPU each on GPU nodes): between training stages the nodes'
CPUs stay free for Ray tasks (ingest, synth generate), and a training stage runs while no task
of this driver does (the demo's stages run one after another).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfm.finetune.config import FinetuneConfig

    from .config import PretrainConfig


@contextmanager
def rank_env(rank: int, world: int, master: tuple[str, int]) -> Iterator[None]:
    """This process as rank `rank` of `world` (one process per node) for the duration: the
    rendezvous variables Lightning reads (train.RENDEZVOUS_ENV). SLURM's come first in its
    search, and Ray nodes started by `srun ray start` pass them on to every actor, so they are
    hidden while a stage runs (the group, not SLURM, owns these ranks)."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    os.environ.update(
        MASTER_ADDR=master[0],
        MASTER_PORT=str(master[1]),
        NODE_RANK=str(rank),
        LOCAL_RANK="0",
        RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Worker:
    """One node's training process (a Ray actor; see `TrainGroup`). It asks Ray for no CPUs, so
    Ray sets it one OpenMP thread: `threads` gives it back the node's cores."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(threads, 1))

    def where(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "host": platform.node(),
        }

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def pretrain(
        self, cfg: PretrainConfig, rank: int, world: int, master: tuple[str, int]
    ) -> dict[str, Any]:
        from .train import run

        return self._as_rank(run, cfg, rank, world, master)

    def finetune(
        self, cfg: FinetuneConfig, rank: int, world: int, master: tuple[str, int]
    ) -> dict[str, Any]:
        """`medfm finetune` as one rank: its engine (Lightning, medfm.finetune.fit) starts DDP
        from the same variables as pretraining's; rank 0 writes the run folder."""
        from medfm.finetune import run

        return self._as_rank(lambda c: {"run": str(run(c))}, cfg, rank, world, master)

    def _as_rank(self, run: Callable, cfg: Any, rank: int, world: int, master: tuple[str, int]):
        import torch.distributed as dist

        train = dataclasses.replace(cfg.train, num_nodes=world, devices=1)
        with rank_env(rank, world, master):
            try:
                summary = run(dataclasses.replace(cfg, train=train))
            finally:  # the next stage (or a single-process call) starts from no process group
                if dist.is_initialized():
                    dist.destroy_process_group()
        return summary | {"rank": rank, **self.where()}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class TrainGroup:
    """One `Worker` actor per node of the connected Ray cluster (nodes with CPUs: a head
    started with `--num-cpus 0` runs no training), started once and reused by every stage."""

    def __init__(self, actors: list[Any], nodes: list[dict[str, Any]]):
        self.actors, self.nodes = actors, nodes
        self._where: list[dict[str, Any]] | None = None

    @classmethod
    def start(cls) -> TrainGroup:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [
            n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0
        ]  # fmt: skip
        if not nodes:
            raise RuntimeError("the Ray cluster has no alive node with CPUs to train on")
        actor = ray.remote(Worker)
        actors = [
            actor.options(
                num_cpus=0,
                num_gpus=1 if n["Resources"].get("GPU", 0) >= 1 else 0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(int(n["Resources"]["CPU"]))
            for n in nodes
        ]
        return cls(actors, nodes)  # they start while the driver goes on (ingest, ...)

    @property
    def where(self) -> list[dict[str, Any]]:
        """Each actor's node id, IP and host (waits until every actor is up)."""
        import ray

        if self._where is None:
            self._where = ray.get([a.where.remote() for a in self.actors])
        return self._where

    @property
    def size(self) -> int:
        return len(self.actors)

    def pretrain(self, cfg: PretrainConfig) -> dict[str, Any]:
        """`run(cfg)` as `size` DDP ranks, one per node; returns rank 0's summary plus
        `workers`: each rank's node id, IP and host."""
        return self._ranks("pretrain", cfg)

    def finetune(self, cfg: FinetuneConfig) -> dict[str, Any]:
        """`medfm finetune` as `size` DDP ranks; rank 0's `run` folder plus `workers`."""
        return self._ranks("finetune", cfg)

    def _ranks(self, method: str, cfg: Any) -> dict[str, Any]:
        import ray

        master = (self.where[0]["ip"], ray.get(self.actors[0].free_port.remote()))
        pending = [
            getattr(a, method).remote(cfg, r, self.size, master) for r, a in enumerate(self.actors)
        ]
        refs = list(pending)
        while pending:  # a failed rank raises at once, not after the others' collective timeout
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
        results = ray.get(refs)
        workers = [{k: r[k] for k in ("rank", "node_id", "ip", "host")} for r in results]
        return results[0] | {"workers": workers}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in rank 0's process (a single-process stage, run on the cluster)."""
        import ray

        return ray.get(self.actors[0].call.remote(fn, *args))

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
