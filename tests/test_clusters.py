"""Cluster configs and launchers, checked without a cluster: the Ray launcher YAML against Ray's
own schema and validator, the KubeRay / PyTorchJob manifests field by field, the rendered sbatch
scripts (bash syntax, SLURM directives, the command they run) and the Ray Jobs entrypoint."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

import medfm.clusters
from medfm.clusters.command import SingleWriterRefused, check_copies
from medfm.clusters.launch_ray import RayJobRequest, dashboard_url, entrypoint, runtime_env
from medfm.clusters.launch_slurm import SlurmJob, pick_template, render_sbatch
from medfm.clusters.templates import template_path
from medfm.compat import validate_cluster_config

CLUSTERS = Path(medfm.clusters.__file__).parent
LAUNCHER_CONFIGS = ["ray/aws.yaml", "ray/gcp.yaml"]
KUBERAY = [
    "ray/kuberay/raycluster.yaml",
    "ray/kuberay/rayjob-ingest.yaml",
    "ray/kuberay/rayjob-synth.yaml",
]
SECRET_WORDS = ("aws_secret_access_key", "aws_access_key_id", "private_key", "password", "token:")


def load(relative: str) -> dict:
    return yaml.safe_load(template_path(relative).read_text())


def medfm_cli(*args: str, env: dict | None = None):
    """The real `medfm` CLI, in-process (a subprocess pays ~5 s of imports per call)."""
    from typer.testing import CliRunner

    from medfm.cli import app

    return CliRunner().invoke(app, list(args), env=env)


# -- Ray cluster launcher ---------------------------------------------------------------------


@pytest.mark.parametrize("relative", LAUNCHER_CONFIGS)
def test_launcher_yaml_validates_against_ray_schema(relative):
    schema_file = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = load(relative)
    jsonschema.validate(config, json.loads(schema_file.read_text()))
    validate_cluster_config(config)  # Ray's own check: defaults filled, node types validated


@pytest.mark.parametrize("relative", LAUNCHER_CONFIGS)
def test_launcher_yaml_has_cpu_ingest_and_gpu_train_workers(relative):
    types = load(relative)["available_node_types"]
    assert types["cpu_ingest"]["resources"]["CPU"] >= 8
    assert "GPU" not in types["cpu_ingest"]["resources"]
    assert types["gpu_train"]["resources"]["GPU"] >= 1
    assert types["head"]["resources"]["CPU"] == 0  # drivers only


@pytest.mark.parametrize("relative", LAUNCHER_CONFIGS)
def test_launcher_yaml_pins_this_medfm_version(relative):
    setup = " ".join(load(relative)["setup_commands"])
    assert f"medfm=={medfm.__version__}" in setup


# -- KubeRay and Kubeflow manifests ------------------------------------------------------------


def check_pod(pod: dict, *, gpu: bool = False) -> list[dict]:
    """Every container has an image, requests == limits for cpu/memory, and GPUs if asked."""
    containers = pod["spec"]["containers"]
    assert containers
    for c in containers:
        assert c["image"].split(":")[-1] == medfm.__version__, c["image"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= set(req), c["name"]
        assert req["cpu"] == lim["cpu"] and req["memory"] == lim["memory"]
        assert ("nvidia.com/gpu" in req) == gpu, c["name"]
        for env in c.get("env", []):  # secrets only by reference
            assert "value" not in env or "KEY" not in env["name"], env
    return containers


def check_ray_cluster_spec(spec: dict, gpu_group: bool) -> None:
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in check_pod(head["template"])[0]["ports"]}
    assert {6379, 8265} <= ports
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(g)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        check_pod(g["template"], gpu="gpu" in g["groupName"])
    assert any("gpu" in g["groupName"] for g in groups) == gpu_group


def check_medfm_entrypoint(entry: str, stage: list[str]) -> list[str]:
    argv = shlex.split(entry)
    assert argv[:5] == ["python", "-m", "medfm.clusters.run", "--expect-version", medfm.__version__]
    args = argv[6:]
    assert args[: len(stage)] == stage
    assert "--address" in args and args[args.index("--address") + 1] == "auto"
    return args


def test_kuberay_raycluster_manifest():
    doc = load("ray/kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], gpu_group=True)
    assert {g["groupName"] for g in doc["spec"]["workerGroupSpecs"]} == {"cpu-ingest", "gpu-train"}


@pytest.mark.parametrize(
    "relative,stage,gpu",
    [
        ("ray/kuberay/rayjob-ingest.yaml", ["ingest"], False),
        ("ray/kuberay/rayjob-synth.yaml", ["synth", "generate"], True),
    ],
)
def test_kuberay_rayjob_manifest_runs_medfm(relative, stage, gpu):
    doc = load(relative)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    args = check_medfm_entrypoint(spec["entrypoint"], stage)
    out = args[args.index("--out") + 1]
    assert out.startswith(("s3://", "gs://"))  # object storage through fsspec
    check_ray_cluster_spec(spec["rayClusterSpec"], gpu_group=gpu)
    assert parse_with_medfm_cli(args)["out"] == out


def parse_with_medfm_cli(args: list[str]) -> dict:
    """Parse `args` with the real `medfm` CLI down to the leaf command; raises on an unknown
    option or a missing value, so a manifest cannot drift from the CLI."""
    from typer.main import get_command

    from medfm.cli import app

    cmd, name = get_command(app), "medfm"
    while args and args[0] in getattr(cmd, "commands", {}):
        name, cmd, args = args[0], cmd.commands[args[0]], args[1:]
    return cmd.make_context(name, list(args)).params


def test_kubeflow_pytorchjob_manifest_runs_medfm_pretrain():
    doc = load("k8s/pytorchjob-pretrain.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    nodes = sum(r["replicas"] for r in replicas.values())
    gpus = int(doc["spec"]["nprocPerNode"])
    for r in replicas.values():
        (c,) = check_pod(r["template"], gpu=True)
        assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        cmd = c["command"]
        assert cmd[:5] == ["torchrun", "--no-python", "medfm", "pretrain", "--config"]
        assert f"train.num_nodes={nodes}" in cmd and f"train.devices={gpus}" in cmd


@pytest.mark.parametrize("relative", LAUNCHER_CONFIGS + KUBERAY + ["k8s/pytorchjob-pretrain.yaml"])
def test_configs_carry_no_secrets(relative):
    text = template_path(relative).read_text().lower()
    assert not any(word in text for word in SECRET_WORDS)
    assert "akia" not in text  # AWS access key id prefix


# -- SLURM --------------------------------------------------------------------------------------


def sbatch_directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key] = value
    return out


def test_train_sbatch_multinode_lightning():
    job = SlurmJob(nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00", mem="400G")
    script = render_sbatch(job, ["medfm", "pretrain", "--config", "cfg a.yaml"])
    d = sbatch_directives(script)
    assert d["--nodes"] == "4" and d["--ntasks-per-node"] == "8" and d["--gpus-per-node"] == "8"
    assert d["--signal"] == "SIGUSR1@90" and "--requeue" in d and d["--open-mode"] == "append"
    assert d["--partition"] == "gpu" and d["--time"] == "2-00:00:00" and d["--mem"] == "400G"
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert argv[argv.index("medfm") :] == [
        "medfm",
        "pretrain",
        "--config",
        "cfg a.yaml",
        "train.num_nodes=4",
    ]  # devices=auto already means the 8 GPUs
    assert "--resume" not in argv  # first run must not ask for a checkpoint (Lightning #20347)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_ray_sbatch_starts_head_and_workers_then_ingest():
    script = render_sbatch(
        SlurmJob(nodes=3, cpus_per_task=32), ["ingest", "spec.yaml", "--out", "s3://b/x"]
    )
    d = sbatch_directives(script)
    assert d["--nodes"] == "3" and d["--ntasks-per-node"] == "1" and "--signal" not in d
    assert "ray start --head" in script and 'ray start --address "${RAY_ADDRESS}"' in script
    assert 'medfm ingest spec.yaml --out s3://b/x --address "${RAY_ADDRESS}"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_explicit_layout_and_address_are_kept():
    script = render_sbatch(SlurmJob(nodes=2, tasks_per_node=2), ["pretrain", "-c", "x.yaml"])
    assert "x.yaml train.num_nodes=2 train.devices=2\n" in script  # 2 CPU tasks: not auto
    script = render_sbatch(
        SlurmJob(nodes=2, tasks_per_node=2), ["pretrain", "-c", "x.yaml", "train.devices=2"]
    )
    assert script.count("train.devices=") == 1 and "train.num_nodes=2" in script
    script = render_sbatch(SlurmJob(), ["pretrain", "-c", "x.yaml"])
    assert "medfm pretrain -c x.yaml\n" in script  # one CPU task on one node: defaults fit
    script = render_sbatch(SlurmJob(), ["ingest", "s.yaml", "--out", "o", "--address", "h:1"])
    assert "medfm ingest s.yaml --out o --address h:1\n" in script
    assert 'h:1 --address "${RAY_ADDRESS}"' not in script


def test_template_choice_follows_the_stage():
    assert pick_template(["medfm", "ingest", "s.yaml", "--out", "o"]) == "ray"
    assert pick_template(["synth", "generate", "--model", "m", "--n", "4", "--out", "o"]) == "ray"
    assert pick_template(["synth", "audit", "o"]) == "train"
    assert pick_template(["medfm", "finetune", "--config", "c.yaml"]) == "train"
    with pytest.raises(ValueError, match="after `--`"):
        pick_template([])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"nodes": 0}, "--nodes"),
        ({"time": "tomorrow"}, "--time"),
        ({"job_name": "a b"}, "--job-name"),
        ({"extra_sbatch": ["--x=1\nrm -rf /"]}, "--sbatch"),
    ],
)
def test_bad_slurm_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_sbatch(SlurmJob(**kwargs), ["pretrain", "-c", "x.yaml"])


def test_launch_slurm_dry_run_cli_prints_the_script():
    r = medfm_cli(
        "launch",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--dry-run",
        "--setup",
        "source /opt/venv/bin/activate",
        "--",
        "medfm",
        "pretrain",
        "--config",
        "c.yaml",
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "source /opt/venv/bin/activate" in r.stdout
    assert "medfm pretrain --config c.yaml train.num_nodes=2\n" in r.stdout
    r = medfm_cli("launch", "slurm", "--dry-run")
    assert r.exit_code != 0 and "no command given" in r.stderr


def test_launch_slurm_without_sbatch_fails_clearly(tmp_path):
    no_sbatch = {"PATH": str(tmp_path)}
    r = medfm_cli(
        "launch", "slurm", "--log-dir", str(tmp_path / "l"), "--", "pretrain", env=no_sbatch
    )
    assert r.exit_code == 1 and "sbatch` not found" in r.stderr


SINGLE_WRITERS = [
    ["medfm", "demo", "--out", "/shared/demo"],
    ["medfm", "ingest", "s.yaml", "--out", "/shared/x"],
    ["medfm", "ingest", "s.yaml", "--out", "/shared/x", "--address", "h:6379"],
    ["medfm", "synth", "generate", "--model", "m", "--n", "8", "--out", "/shared/y"],
    ["medfm", "synth", "audit", "/shared/y"],
    ["medfm", "shards", "verify", "/shared/x"],
    ["medfm", "hub", "push", "run", "hub://org/model"],
    ["medfm", "finetune", "--config", "ft.yaml"],  # one plain process, no ranks
]


def dry_run_slurm(*options: str, command: list[str]):
    return medfm_cli("launch", "slurm", *options, "--dry-run", "--", *command)


@pytest.mark.parametrize("command", SINGLE_WRITERS, ids=lambda c: " ".join(c[1:3]))
@pytest.mark.parametrize("layout", [("--nodes", "16"), ("--nodes", "1", "--gpus-per-node", "4")])
def test_launch_slurm_refuses_copies_of_a_single_writer_command(command, layout):
    # `--template train` is what puts ingest and synth generate under srun; the others get it
    # by default.
    r = dry_run_slurm(*layout, "--template", "train", command=command)
    copies = 16 if "16" in layout else 4
    assert r.exit_code == 2 and r.stdout == "", r.stdout[-500:]
    assert f"{copies} independent copies" in r.stderr and "single-writer" in r.stderr, r.stderr
    if command[1] in ("ingest", "synth", "demo") and command[2] != "audit":  # Ray drivers
        assert "--template ray" in r.stderr and "--address HEAD" in r.stderr
        assert "medfm launch ray" in r.stderr
        instead = dry_run_slurm(*layout, "--template", "ray", command=command)
    else:
        assert "`--nodes 1 --tasks-per-node 1`" in r.stderr
        instead = dry_run_slurm("--nodes", "1", "--tasks-per-node", "1", command=command)
    # What the message says to do instead renders: one copy, as the script's last command.
    assert instead.exit_code == 0, instead.stderr
    assert instead.stdout.count(shlex.join(command)) == 1, instead.stdout


def test_launch_slurm_accepts_pretrain_ranks_and_a_ray_driver():
    r = dry_run_slurm("--nodes", "16", "--gpus-per-node", "8", command=["pretrain", "-c", "c.yaml"])
    assert r.exit_code == 0, r.stderr
    assert "srun --kill-on-bad-exit=1 medfm pretrain -c c.yaml train.num_nodes=16\n" in r.stdout
    # The default template for ingest runs it once, as the driver of the allocation's Ray.
    r = dry_run_slurm("--nodes", "16", command=SINGLE_WRITERS[1][1:])
    assert r.exit_code == 0, r.stderr
    assert not any(line.startswith("srun") and "medfm" in line for line in r.stdout.splitlines())
    assert 'medfm ingest s.yaml --out /shared/x --address "${RAY_ADDRESS}"\n' in r.stdout


def test_kubeflow_pytorchjob_starts_cooperating_ranks_only():
    doc = load("k8s/pytorchjob-pretrain.yaml")
    replicas = sum(r["replicas"] for r in doc["spec"]["pytorchReplicaSpecs"].values())
    copies = replicas * int(doc["spec"]["nprocPerNode"])
    (container,) = doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    command = container["command"][container["command"].index("medfm") :]
    check_copies(command, copies, "PyTorchJob")  # pretrain ranks: accepted
    with pytest.raises(SingleWriterRefused, match=f"{copies} independent copies"):
        check_copies(["medfm", "demo"], copies, "PyTorchJob")


def test_torchrun_recipe_is_valid_bash():
    subprocess.run(["bash", "-n", str(template_path("torchrun/pretrain.sh"))], check=True)
    subprocess.run(["bash", "-n", str(template_path("slurm/local_cluster.sh"))], check=True)


# -- Ray Jobs launcher ---------------------------------------------------------------------------


def test_ray_job_entrypoint_and_runtime_env_pin_the_version():
    req = RayJobRequest(
        address="h:8265", command=["medfm", "ingest", "s.yaml", "--out", "s3://b/o"]
    )
    assert shlex.split(entrypoint(req.command)) == [
        "python",
        "-m",
        "medfm.clusters.run",
        "--expect-version",
        medfm.__version__,
        "--",
        "ingest",
        "s.yaml",
        "--out",
        "s3://b/o",
        "--address",
        "auto",
    ]
    env = runtime_env(req)
    assert env["pip"]["packages"] == [f"medfm=={medfm.__version__}"]
    assert env["env_vars"]["MEDFM_VERSION"] == medfm.__version__
    check = runtime_env(RayJobRequest(address="h", command=["version"], pin="check"))
    assert "pip" not in check
    assert dashboard_url("10.0.0.1:8265") == "http://10.0.0.1:8265"
    with pytest.raises(ValueError, match="dashboard"):
        dashboard_url("ray://10.0.0.1:10001")
    with pytest.raises(ValueError, match="--pin"):
        RayJobRequest(address="h", command=["version"], pin="conda").validate()


def test_run_entrypoint_refuses_a_version_mismatch(capsys):
    from medfm.clusters.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--expect-version", "0.0.0-other", "--", "version"])
    assert "version mismatch" in str(exc.value.code) and "0.0.0-other" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["--expect-version", medfm.__version__, "--", "version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == medfm.__version__


def docs_launch_commands() -> list[list[str]]:
    """Each `medfm launch ...` line of docs/clusters.md's bash blocks, continuations joined."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "clusters.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    launches = [line for line in lines if line.strip().startswith("medfm launch")]
    return [shlex.split(line, comments=True) for line in launches]


def test_docs_launch_commands_match_the_cli():
    commands = docs_launch_commands()
    assert {c[2] for c in commands} == {"ray", "slurm"} and len(commands) >= 6
    for argv in commands:
        if argv[2] == "slurm":  # render for real, submit nothing
            dash = argv.index("--")
            r = medfm_cli(*argv[1:dash], "--dry-run", *argv[dash:])
            assert r.exit_code == 0 and r.stdout.startswith("#!/bin/bash"), (argv, r.stderr)
        else:
            params = parse_with_medfm_cli(argv[1:])
            assert params["address"].startswith("http://"), argv
