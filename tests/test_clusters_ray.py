"""`medfm launch ray` on a real two-node Ray cluster (two `ray start` nodes on loopback with
separate resources): an ingest job submitted through the Jobs API runs tasks on both nodes, and
its output verifies."""

from __future__ import annotations

import json
import subprocess

import pytest
from clusters_helpers import MEDFM, local_ray_cluster, write_volumes
from ingest_helpers import KEY

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    # The de-identification key reaches the nodes through their environment, as on a real
    # cluster (a Kubernetes Secret, the node's environment); never through the launcher.
    with local_ray_cluster({"MEDFM_DEID_KEY": KEY.decode()}) as cluster:
        yield cluster


def launch(cluster, *command: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            MEDFM,
            "launch",
            "ray",
            "--address",
            cluster.dashboard,
            "--pin",
            "check",
            *extra,
            "--",
            *command,
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ingest_job_runs_on_both_nodes_and_verifies(ray_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes, list_tasks

    write_volumes(tmp_path / "data", 8)
    spec = {
        "sources": [{"name": "vols", "root": str(tmp_path / "data"), "modality": "CT"}],
        "volume": {"spacing": [2.0, 2.0, 2.0]},
        "shards": {"task_items": 1},  # one Ray task per volume: 8 tasks for 2 nodes
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    dest = tmp_path / "shards"
    r = launch(
        ray_cluster,
        "medfm",
        "ingest",
        str(tmp_path / "spec.yaml"),
        "--out",
        str(dest),
        "--workers",
        "2",
        "--quiet",
        extra=("--submission-id", "medfm-ingest-test"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stderr
    # The driver saw the cluster, not a private local Ray: it ran with `--address auto`.
    assert "--address auto" in r.stdout

    job = JobSubmissionClient(ray_cluster.dashboard).get_job_info("medfm-ingest-test")
    assert job.metadata["medfm_version"] and job.runtime_env["env_vars"]["MEDFM_VERSION"]
    nodes = {n.node_id: n for n in list_nodes(address=ray_cluster.dashboard)}
    tasks = list_tasks(
        address=ray_cluster.dashboard,
        filters=[("job_id", "=", job.job_id)],
        detail=True,
        limit=1000,
    )
    finished = [t for t in tasks if t.state == "FINISHED" and t.type == "NORMAL_TASK"]
    by_node: dict[str, set[str]] = {}
    for t in finished:
        labels = nodes[t.node_id].resources_total
        where = "head" if "medfm_head" in labels else "worker" if "medfm_worker" in labels else "?"
        by_node.setdefault(where, set()).add(t.name)
    assert set(by_node) == {"head", "worker"}, by_node  # both nodes did work
    assert any("convert" in name for names in by_node.values() for name in names), by_node

    v = subprocess.run([MEDFM, "shards", "verify", str(dest)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    assert " 8 rows checked" in v.stdout or "8 rows" in v.stdout


def test_failed_job_fails_the_launcher(ray_cluster, tmp_path):
    r = launch(ray_cluster, "medfm", "shards", "verify", str(tmp_path / "missing"))
    assert r.returncode == 1 and "FAILED" in r.stderr, r.stderr[-2000:]
