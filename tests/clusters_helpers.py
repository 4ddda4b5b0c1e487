"""Real local clusters for the cluster tests: a two-node Ray cluster on loopback (two `ray start`
processes with separate resources) and a one-node SLURM cluster (clusters/slurm/local_cluster.sh).
Each is torn down by the process ids it started, never with `ray stop` (other Ray runtimes on the
machine are left alone). Plus the small real inputs the cluster jobs run on."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import medfm.clusters

BIN = Path(sys.executable).parent
MEDFM = str(BIN / "medfm")
RAY = str(BIN / "ray")
LOCAL_SLURM = Path(medfm.clusters.__file__).parent / "slurm" / "local_cluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_PORTS = range(20_000, 32_768)


def rendezvous_port() -> int:
    """A free port for a DDP rendezvous (MASTER_PORT) outside Linux's ephemeral range (32768+)
    and Ray's worker ports (10002-19999): a probed ephemeral port was taken by another
    process's outgoing connection before rank 0 bound it (EADDRINUSE in CI)."""
    import random

    for port in random.sample(RENDEZVOUS_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free rendezvous port in 20000-32767")


def cluster_env(**extra: str) -> dict[str, str]:
    """Environment for every process of a test cluster: the venv first on PATH, token auth off
    (a `~/.ray/auth_token` left by another local run would otherwise switch it on for some of
    the processes only), no usage stats, one thread per process on this 2-core box."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@dataclass
class RayCluster:
    gcs: str  # 127.0.0.1:PORT
    dashboard: str  # http://127.0.0.1:PORT (Jobs API and state API)
    temp_dir: Path
    env: dict[str, str]


# Every port option of `ray start` (Ray 2.60), set on every node: an option left out falls back to
# a default (10001, 8265, 52365) or a random port that can land inside another node's worker
# range. A worker node binds no dashboard or client server, but Ray still reserves both numbers
# on it and refuses to start when one lies in its own worker range. `--port` (GCS) is head-only.
NODE_PORT_OPTIONS = (
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)
HEAD_PORT_OPTIONS = ("port", *NODE_PORT_OPTIONS)
WORKER_PORTS = 400  # per node; the test jobs start a few dozen worker processes at most
# Worker ranges are drawn below Linux's default ephemeral range (32768-60999), where the kernel
# picks the single ports (free_port) and the client ends of connections: a connection made while
# the cluster runs cannot then sit on a worker's port. Disjointness never relies on this: every
# draw is checked against all ports already taken, whatever the machine's ephemeral range.
WORKER_RANGE_SPAN = (20000, 32000)
MAX_DRAWS = 200


@dataclass(frozen=True)
class NodePorts:
    """All the ports of one Ray node: single ports by `ray start` option, and the worker range."""

    single: dict[str, int]
    workers: range

    def args(self) -> list[str]:
        return [f"--{name}={port}" for name, port in self.single.items()] + [
            f"--min-worker-port={self.workers.start}",
            f"--max-worker-port={self.workers.stop - 1}",
        ]


def allocate_ports(nodes: int = 2, rng: random.Random | None = None) -> list[NodePorts]:
    """Ports for `nodes` Ray nodes on one host, the head first. No port or range overlaps any
    other on any node (Ray checks only within one node, and two nodes here share one host), and
    each was free when drawn."""
    rng = rng or random.Random()
    taken: set[int] = set()
    ranges = [_draw_range(rng, taken) for _ in range(nodes)]
    return [
        NodePorts(
            {name: _draw_port(taken) for name in (NODE_PORT_OPTIONS if i else HEAD_PORT_OPTIONS)},
            workers,
        )
        for i, workers in enumerate(ranges)
    ]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _draw_range(rng: random.Random, taken: set[int]) -> range:
    low, high = WORKER_RANGE_SPAN
    for _ in range(MAX_DRAWS):
        start = rng.randrange(low, high - WORKER_PORTS)
        workers = range(start, start + WORKER_PORTS)
        if taken.isdisjoint(workers) and all(_is_free(p) for p in workers):
            taken.update(workers)
            return workers
    raise RuntimeError(f"no {WORKER_PORTS} free consecutive ports in {low}-{high} on 127.0.0.1")


def _draw_port(taken: set[int]) -> int:
    for _ in range(MAX_DRAWS):
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("the kernel keeps handing out ports this cluster already uses")


def ray_start_args(
    head: NodePorts, worker: NodePorts, temp_dir: Path
) -> tuple[list[str], list[str]]:
    """The `ray start` arguments of the head (1 CPU, resource `medfm_head`) and of the second
    node (1 CPU, `medfm_worker`)."""
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--node-ip-address=127.0.0.1"]
    head_args = [
        "--head",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        '--resources={"medfm_head": 1}',
        *common,
        *head.args(),
    ]
    worker_args = [
        f"--address=127.0.0.1:{head.single['port']}",
        '--resources={"medfm_worker": 1}',
        *common,
        *worker.args(),
    ]
    return head_args, worker_args


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(
            f"ray start {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
        )


def _kill_processes_under(temp_dir: Path) -> None:
    """Terminate the raylets, GCS, dashboard and agents of this cluster (their command lines
    name its temp dir); workers exit when their raylet goes."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(temp_dir) in cmdline and p.pid != os.getpid():
            mine.append(p)
    for p in mine:
        p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=3)
    for p in alive:
        p.kill()


@contextmanager
def local_ray_cluster(env_extra: dict[str, str] | None = None):
    """A head (1 CPU, resource `medfm_head`) and a second node (1 CPU, `medfm_worker`)."""
    # Short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="mray", dir="/tmp"))
    env = cluster_env(**(env_extra or {}))
    head, worker = allocate_ports(2)
    head_args, worker_args = ray_start_args(head, worker, temp_dir)
    port, dash = head.single["port"], head.single["dashboard-port"]
    try:
        _ray_start(head_args, env)
        _ray_start(worker_args, env)
        cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, env)
        wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        _kill_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_nodes(cluster: RayCluster, n: int, timeout_s: float = 120) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            alive = [x for x in list_nodes(address=cluster.dashboard) if x.state == "ALIVE"]
            if len(alive) >= n:
                return
        except Exception:  # the dashboard answers a few seconds after `ray start` returns
            pass
        time.sleep(1)
    raise TimeoutError(f"only some of {n} Ray nodes came up at {cluster.gcs}")


@contextmanager
def local_slurm_cluster(cpus: int = 2):
    """Start slurmctld + slurmd on localhost; yields the environment that points at them."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        import pytest

        pytest.skip("SLURM is not installed (apt-get install -y slurm-wlm)")
    state = Path(tempfile.mkdtemp(prefix="mslurm", dir="/tmp"))
    r = subprocess.run(
        ["bash", str(LOCAL_SLURM), "start", str(state), str(cpus)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        import pytest

        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(state)], timeout=60)
        pytest.skip(f"the SLURM daemons cannot run here: {r.stderr.strip()[-1500:]}")
    try:
        yield cluster_env(SLURM_CONF=str(state / "slurm.conf")), state
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def tiny_mae_config(shards: Path, out_dir: Path, **train) -> dict:
    """A tiny 2D MAE on PneumoniaMNIST, CPU, fp32; `train` adds/overrides train settings."""
    return {
        "name": "cluster-mae2d",
        "out_dir": str(out_dir),
        "data": {
            "shards": str(shards),
            "split": "train",
            "kinds": ["image2d"],
            "batch_size": 8,
            "num_workers": 0,
        },
        "model": {
            "name": "vit2d",
            "size": "tiny",
            "img_size": 28,
            "patch_size": 4,
            "in_chans": 1,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
        },
        "objectives": [
            {
                "name": "mae",
                "mask_ratio": 0.75,
                "decoder_dim": 32,
                "decoder_depth": 1,
                "decoder_heads": 2,
            }
        ],
        "train": {
            "max_steps": 6,
            "warmup_steps": 1,
            "lr": 1e-3,
            "checkpoint_every": 1000,
            "log_every": 1,
            "plots": False,
            "loggers": ["csv"],
            "accelerator": "cpu",
            "precision": "32-true",
            **train,
        },
    }


def write_volumes(root: Path, n: int) -> None:
    """n real MR volumes (nibabel's anatomical.nii, shifted) as NIfTI files for ingest."""
    import SimpleITK as sitk
    from ingest_helpers import small_ct

    root.mkdir()
    vol = small_ct()
    for i in range(n):
        sitk.WriteImage(sitk.Cast(vol + i, sitk.sitkInt16), str(root / f"vol{i:02d}.nii.gz"))
