"""`medfm demo --address RAY_ADDRESS`: the same demo, run by a driver connected to a Ray cluster.

- ingest: the demo's one Ray runtime is the cluster's, so `medfm ingest`'s conversion tasks
  spread over its nodes;
- pretraining: each `medfm pretrain` stage runs as DDP ranks, one per node, in a group of Ray
  actors started once (medfm.pretrain.ray_train); fine-tuning runs in rank 0's actor, on the
  cluster (it is a single-process job, docs/clusters.md);
- outputs: every stage writes under `--out`, which must be a folder every node mounts at the
  same path (checked before anything runs); the report and summary are written there.

The summary gets a `cluster` record: the nodes, the Ray tasks (ingest's conversions) each node
ran, and the ranks and nodes of every training stage.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfm.io import write_text

if TYPE_CHECKING:
    from medfm.finetune.config import FinetuneConfig
    from medfm.pretrain.config import PretrainConfig
    from medfm.pretrain.ray_train import TrainGroup

PROBE = ".medfm-shared-check"  # written under --out, read back on every node


@contextmanager
def connect(address: str | None) -> Iterator[DemoCluster | None]:
    """The demo's cluster for `address` (None: no cluster, every stage local)."""
    if not address:
        yield None
        return
    import ray

    from medfm.pretrain.ray_train import TrainGroup

    ray.init(address=address, log_to_driver=False)
    try:
        group = TrainGroup.start()
        try:
            yield DemoCluster(group, address)
        finally:
            group.shutdown()
    finally:
        ray.shutdown()


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass
class DemoCluster:
    group: TrainGroup
    address: str
    train: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> its ranks

    def check_shared(self, out: Path) -> None:
        """Refuse an `--out` that some node cannot read at the same path: its stages would
        write shards, runs and exports where the others never find them."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe, nonce = out / PROBE, os.urandom(8).hex()
        write_text(probe, nonce)
        read = ray.remote(num_cpus=0)(_read_probe)
        try:
            seen = ray.get(
                [
                    read.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                    ).remote(str(probe))
                    for n in self.group.nodes
                ]
            )
        finally:
            probe.unlink()
        nodes = self.group.nodes
        blind = [n["NodeManagerAddress"] for n, s in zip(nodes, seen, strict=True) if s != nonce]
        if blind:
            raise SystemExit(
                f"demo: --out {out} is not visible at the same path on the node(s) {blind}; "
                "with --address, put --out on storage every node mounts (NFS, Lustre, ...)"
            )

    def pretrain(self, name: str, cfg: PretrainConfig) -> dict[str, Any]:
        """One pretraining stage as DDP ranks across the nodes; rank 0's summary."""
        summary = self.group.pretrain(cfg)
        self.train[name] = summary["workers"]
        nodes = len({w["node_id"] for w in summary["workers"]})
        print(f"[demo] {name}: {len(summary['workers'])} DDP ranks on {nodes} node(s)", flush=True)
        return summary

    def finetune(self, name: str, cfg: FinetuneConfig) -> Path:
        """`medfm finetune` as DDP ranks across the nodes; returns rank 0's run folder."""
        summary = self.group.finetune(cfg)
        self.train[name] = summary["workers"]
        nodes = len({w["node_id"] for w in summary["workers"]})
        print(f"[demo] {name}: {len(summary['workers'])} DDP ranks on {nodes} node(s)", flush=True)
        return Path(summary["run"])

    def record(self) -> dict[str, Any]:
        """Where the run's work happened, for summary.json."""
        import ray
        from ray.util.state import list_tasks

        ctx = ray.get_runtime_context()
        tasks = list_tasks(
            address=ctx.gcs_address,
            filters=[("job_id", "=", ctx.get_job_id()), ("state", "=", "FINISHED")],
            detail=True,
            limit=10_000,  # the state API's maximum
        )
        per_node: dict[str, Counter] = {}
        for t in tasks:
            if t.type == "NORMAL_TASK" and t.name != _read_probe.__name__:
                per_node.setdefault(t.node_id, Counter())[t.name] += 1
        return {
            "address": self.address,
            "job_id": ctx.get_job_id(),
            "nodes": [n["NodeID"] for n in self.group.nodes],
            "tasks_per_node": {node: dict(names) for node, names in per_node.items()},
            "train": self.train,
        }
