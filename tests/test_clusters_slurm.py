"""`medfm launch slurm` on a real SLURM cluster (slurmctld + slurmd on localhost, configured by
clusters/slurm/local_cluster.sh): the rendered script is submitted with sbatch and runs `medfm
pretrain` under srun; SIGUSR1 mid-run makes Lightning save an HPC checkpoint and requeue the job,
the requeued run resumes from that checkpoint (not from step 0) and the job completes."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from clusters_helpers import MEDFM, local_slurm_cluster, tiny_mae_config, write_volumes
from ingest_helpers import KEY
from pretrain_helpers import pneumonia_shards

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
STEPS = 600  # long enough to be signalled mid-way: a tiny MAE step takes ~0.1 s here


@pytest.fixture(scope="module")
def slurm():
    with local_slurm_cluster(cpus=2) as (env, state):
        yield env, state


def job_fields(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, what: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def job_running(env: dict, job_id: str, log: Path) -> bool:
    """True while the job is queued or running; fails the test at once if it ended early."""
    state = job_fields(env, job_id)["JobState"]
    if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        pytest.fail(f"job {job_id} ended early ({state}):\n{log.read_text()[-4000:]}")
    return True


def ledger_steps(run: Path) -> list[int]:
    path = run / "ledger" / "rank0.txt"
    if not path.exists():
        return []
    return [int(line.split("\t")[0]) for line in path.read_text().splitlines() if "\t" in line]


def test_sbatch_pretrain_sigusr1_requeues_and_resumes(slurm, tmp_path):
    env, _ = slurm
    data = os.environ.get("MEDFM_SAMPLE_DATA")
    if not data:
        pytest.skip("MEDFM_SAMPLE_DATA is not set (PneumoniaMNIST shards are built from it)")
    shards = pneumonia_shards(Path(data), tmp_path / "shards", n=128)
    run = tmp_path / "run"
    cfg = tiny_mae_config(shards, run, max_steps=STEPS, ledger=True, checkpoint_every=10_000)
    cfg["data"]["batch_size"] = 64
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    submit = subprocess.run(
        [
            MEDFM,
            "launch",
            "slurm",
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--time",
            "00:15:00",
            "--job-name",
            "medfm-requeue",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "medfm",
            "pretrain",
            "--config",
            str(tmp_path / "cfg.yaml"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    log = tmp_path / "logs" / f"medfm-requeue-{job_id}.out"

    # Signal once training is under way and well before the end.
    wait_for(
        lambda: job_running(env, job_id, log) and len(set(ledger_steps(run))) >= 10,
        "10 training steps",
        240,
    )
    assert max(ledger_steps(run)) < STEPS - 20, "the run is too fast to be signalled mid-way"
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)

    wait_for(lambda: job_fields(env, job_id).get("Restarts") == "1", "the requeue", 120)
    # SLURM holds a requeued job for a while (BeginTime); release it now instead of waiting.
    wait_for(lambda: job_fields(env, job_id)["JobState"] == "PENDING", "PENDING", 120)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    wait_for(
        lambda: job_fields(env, job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"),
        "the requeued job to finish",
        420,
    )
    fields, text = job_fields(env, job_id), log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-4000:]
    assert "restart 0" in text and "restart 1" in text
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert hpc, f"no HPC checkpoint in {run}: {text[-3000:]}"
    assert "Restored all states from the checkpoint" in text and str(hpc[-1]) in text

    # Each step's sample keys are in the ledger. Step 0 ran once: the requeued run did not
    # start over. The first run went on training after SIGUSR1 saved the HPC checkpoint, until
    # SLURM stopped it; the requeued run redid exactly those steps, from the checkpoint's step.
    # The ledger is written at batch start, so the 10 ledgered steps we waited for mean at least
    # 9 finished ones when the signal went out.
    per_step = Counter(ledger_steps(run))
    assert per_step[0] == per_step[1] > 0
    assert set(per_step) == set(range(STEPS))
    saved_at = torch.load(hpc[-1], weights_only=True, map_location="cpu")["global_step"]
    redone = sorted(step for step, n in per_step.items() if n > per_step[0])
    assert saved_at >= 9 and redone == list(range(saved_at, saved_at + len(redone))), (
        saved_at,
        redone,
    )
    assert (run / "export").is_dir()


def test_sbatch_ray_template_runs_ingest_on_the_allocation(slurm, tmp_path):
    env, _ = slurm
    write_volumes(tmp_path / "data", 3)
    spec = {"sources": [{"name": "vols", "root": str(tmp_path / "data"), "modality": "CT"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    submit = subprocess.run(
        [MEDFM, "launch", "slurm", "--nodes", "1", "--cpus-per-task", "2", "--time", "00:10:00",
         "--job-name", "medfm-ray", "--log-dir", str(tmp_path / "logs"),
         "--", "medfm", "ingest", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"),
         "--quiet"],
        env={**env, "MEDFM_DEID_KEY": KEY.decode()},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    log = tmp_path / "logs" / f"medfm-ray-{job_id}.out"
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    wait_for(lambda: job_fields(env, job_id)["JobState"] in done, "the Ray-on-SLURM job", 300)
    text = log.read_text()
    shutil.rmtree(f"/tmp/ray-{getpass.getuser()}-{job_id}", ignore_errors=True)  # Ray's logs
    assert job_fields(env, job_id)["JobState"] == "COMPLETED", text[-4000:]
    assert "Ray cluster ready: 1 node(s)" in text
    assert '"written": 3' in text
    verify = subprocess.run([MEDFM, "shards", "verify", str(tmp_path / "out")], env=env)
    assert verify.returncode == 0
