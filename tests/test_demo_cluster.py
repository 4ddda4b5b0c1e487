"""`medfm demo` on a Ray cluster: `--quick --address` on the real two-node loopback cluster the
cluster tests start (tests/clusters_helpers.py) runs the same stages as on one node, with
ingest's conversion tasks and every pretraining and fine-tuning stage's DDP ranks on both
nodes, and writes report.html with every modality's figures. Plus how
`medfm launch` renders the demo: one driver joined to the cluster, never N copies."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
from clusters_helpers import MEDFM, local_ray_cluster
from test_clusters import dry_run_slurm
from test_demo import ALL_STAGES, linked_pngs, section_pngs

from medfm.clusters.launch_ray import entrypoint
from medfm.demo.stages import ECG_SECTION, EHR_SECTION

DEMO = ["medfm", "demo", "--quick", "--out", "/shared/demo"]


def test_launch_ray_gives_the_demo_the_jobs_cluster():
    args = shlex.split(entrypoint(DEMO))
    assert args[args.index("--") + 1 :] == [*DEMO[1:], "--address", "auto"]
    # An address the user gave is kept, not doubled.
    args = shlex.split(entrypoint([*DEMO, "--address", "h:6379"]))
    assert args.count("--address") == 1 and args[-2:] == ["--address", "h:6379"]


def test_launch_slurm_runs_one_demo_driver_on_the_allocations_ray():
    r = dry_run_slurm("--nodes", "4", command=DEMO)  # `--template auto`: ray for the demo
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count(shlex.join(DEMO)) == 1
    assert f'{shlex.join(DEMO)} --address "${{RAY_ADDRESS}}"\n' in r.stdout
    assert not any(ln.startswith("srun") and "medfm demo" in ln for ln in r.stdout.split("\n"))


@pytest.mark.parametrize("layout", [("--nodes", "16"), ("--nodes", "1", "--gpus-per-node", "4")])
def test_launch_slurm_refuses_demo_copies_and_says_use_ray(layout):
    r = dry_run_slurm(*layout, "--template", "train", command=DEMO)
    assert r.exit_code == 2 and r.stdout == ""
    assert "independent copies" in r.stderr and "single-writer" in r.stderr
    assert "medfm launch ray" in r.stderr and "--address HEAD" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray_cluster() as cluster:
        yield cluster


@pytest.mark.cluster
@pytest.mark.slow
def test_quick_demo_on_two_nodes(ray_cluster, sample_data, tmp_path):
    from ray.util.state import list_nodes

    out = tmp_path / "demo-out"  # the loopback disk: the same path on both nodes
    proc = subprocess.run(
        [MEDFM, "demo", "--quick", "--out", str(out), "--address", ray_cluster.gcs],
        env=ray_cluster.env | {"MEDFM_SAMPLE_DATA": str(sample_data)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ALL_STAGES  # the same demo as on one node
    assert all(s["status"] == "ok" for s in stages.values()), stages

    alive = {n.node_id for n in list_nodes(address=ray_cluster.dashboard) if n.state == "ALIVE"}
    c = summary["cluster"]
    assert set(c["nodes"]) == alive and len(alive) == 2
    # Ingest's conversion tasks ran on both nodes.
    assert set(c["tasks_per_node"]) == alive, c["tasks_per_node"]
    for node, names in c["tasks_per_node"].items():
        assert any("convert" in name for name in names), (node, names)
    # Every pretraining and fine-tuning stage ran as two DDP ranks, one per node.
    trained = [s.removeprefix("pretrain ") for s in stages if s.startswith("pretrain ")]
    trained += ["finetune lora", "segment liver 3D"]
    assert set(trained) <= set(c["train"]), (trained, list(c["train"]))
    for name in trained:
        ranks = c["train"][name]
        assert sorted(w["rank"] for w in ranks) == [0, 1], (name, ranks)
        assert {w["node_id"] for w in ranks} == alive, (name, ranks)

    links = linked_pngs(out)
    by_section = section_pngs(out)
    for want in ("mae2d/plots/loss.png", "diffusion/plots/loss.png", "audit/report.png",
                 "roc_pulled.png"):  # fmt: skip
        assert any(want in rel for rel in links), (want, links)
    for section, want in ((ECG_SECTION, "roc_ecg_beats.png"), (EHR_SECTION, "roc_ehr_readmission")):
        assert any(want in rel for rel in by_section[section]), (section, by_section)
    assert "interval is wide" in (out / "report.html").read_text()
