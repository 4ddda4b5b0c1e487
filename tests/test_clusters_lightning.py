"""Two-node Lightning on loopback: two `medfm pretrain` processes with MASTER_ADDR=127.0.0.1 and
NODE_RANK 0 and 1 train one DDP model over gloo on CPU. The ranks read disjoint data, so they
only end with identical weights if their gradients were really all-reduced across the nodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clusters_helpers import cluster_env, free_port, tiny_mae_config
from pretrain_helpers import pneumonia_shards
from safetensors import safe_open

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
WORKER = Path(__file__).with_name("clusters_rank_worker.py")
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import os

    data = os.environ.get("MEDFM_SAMPLE_DATA")
    if not data:
        pytest.skip("MEDFM_SAMPLE_DATA is not set (PneumoniaMNIST shards are built from it)")
    return pneumonia_shards(Path(data), tmp_path_factory.mktemp("pm") / "shards", n=128)


def test_two_node_ddp_over_gloo_ranks_agree(shards, tmp_path):
    cfg = tiny_mae_config(
        shards,
        tmp_path / "run",
        max_steps=STEPS,
        num_nodes=2,
        devices=1,
        strategy="ddp",
        ledger=True,
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = cluster_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            NODE_RANK=str(rank),
            PL_TORCH_DISTRIBUTED_BACKEND="gloo",
        )
        for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_JOB_NAME"):
            env.pop(var, None)  # nothing else may decide the layout
        log = open(tmp_path / f"node{rank}.log", "w")
        cmd = [
            sys.executable,
            str(WORKER),
            str(tmp_path / f"rank{rank}.safetensors"),
            "--config",
            str(tmp_path / "cfg.yaml"),
        ]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait(timeout=300)
        log.close()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    for (p, _), text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text[-4000:]

    weights, metas = [], []
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), "pt") as f:
            metas.append(f.metadata())
            weights.append({k: f.get_tensor(k) for k in f.keys()})
    assert [m["rank"] for m in metas] == ["0", "1"] and {m["world"] for m in metas} == {"2"}
    assert {m["step"] for m in metas} == {str(STEPS)}
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for k in weights[0]:
        assert weights[0][k].equal(weights[1][k]), f"ranks disagree on {k}"

    # They trained on different samples: agreement came from the all-reduce, not from the data.
    seen = []
    for rank in (0, 1):
        lines = (tmp_path / "run" / "ledger" / f"rank{rank}.txt").read_text().splitlines()
        seen.append({line.split("\t")[1] for line in lines})  # "step<TAB>sample key"
    assert len(seen[0]) >= 8 and len(seen[1]) >= 8 and not seen[0] & seen[1]
    assert "MEMBER: 2/2" in logs[1] and "distributed_backend=gloo" in logs[0]
