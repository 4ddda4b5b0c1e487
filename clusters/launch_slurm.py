"""Render an sbatch script for any medfm command and submit it with `sbatch`.

Two templates:
- `train`: multi-node Lightning (pretrain, finetune). `srun` starts one task per GPU; Lightning's
  SLURMEnvironment reads the rank layout from SLURM, saves `hpc_ckpt_N.ckpt` into the run's
  `out_dir` and requeues the job on SIGUSR1 (sent 90 s before the time limit). The requeued run is
  the same command: with `ckpt_path=None` under SLURM, Lightning itself restores the newest
  `hpc_ckpt_N.ckpt`. No resume flag is added, so the very first run, which has no checkpoint,
  never asks for one (passing `ckpt_path="hpc"` fails there: Lightning issue #20347), and an
  explicit `--resume` path cannot shadow the fresher HPC checkpoint.
- `ray`: starts a Ray head on the first node and a worker on every other node of the allocation,
  waits until all have joined, then runs the command (ingest, synth, demo) against that cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field

from medfm import __version__

from .command import (
    check_copies,
    needs_ray_address,
    normalize_command,
    runs_on_ray,
    with_layout,
)
from .templates import render

TEMPLATES = {"train": "slurm/train.sbatch.j2", "ray": "slurm/ray.sbatch.j2"}
TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class SlurmJob:
    """What the allocation looks like; every field maps onto one `#SBATCH` line or script step."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU (Lightning DDP), else 1
    cpus_per_task: int = 8
    mem: str | None = None  # e.g. "200G"; None leaves the partition default
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "medfm"
    log_dir: str = "slurm-logs"
    signal_grace_s: int = 90  # SIGUSR1 this many seconds before the time limit
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv)
    extra_sbatch: list[str] = field(default_factory=list)  # raw "--constraint=a100" options
    ray_port: int = 6379

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node must be >= 1, got {self.tasks_per_node}")
        if self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if not TIME_RE.match(self.time):
            raise ValueError(f"--time {self.time!r} is not a SLURM time (D-HH:MM:SS or HH:MM:SS)")
        if not JOB_NAME_RE.match(self.job_name):
            raise ValueError(f"--job-name {self.job_name!r} must match {JOB_NAME_RE.pattern}")
        for opt in self.extra_sbatch:
            if not opt.startswith("--") or "\n" in opt:
                raise ValueError(f"--sbatch option {opt!r} must be one '--name=value' option")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


def pick_template(command: list[str]) -> str:
    """`ray` for stages that run on Ray (ingest, synth generate, demo), `train` for the others."""
    return "ray" if runs_on_ray(command) else "train"


def render_sbatch(job: SlurmJob, command: list[str], template: str = "auto") -> str:
    """The full sbatch script for `command` (a medfm argv) on the allocation `job`."""
    job.validate()
    command = normalize_command(command)
    template = pick_template(command) if template == "auto" else template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    if template == "train":  # srun starts the command once per task; the ray template runs it once
        tasks = job.ntasks_per_node
        check_copies(command, job.nodes * tasks, f"srun: {job.nodes} node(s) x {tasks} task(s)")
        command = with_layout(command, job.nodes, job.ntasks_per_node, job.gpus_per_node)
    return render(
        TEMPLATES[template],
        job=job,
        version=__version__,
        command=shlex.join(command),
        ntasks_per_node=job.ntasks_per_node,
        needs_address=needs_ray_address(command),
    )


def submit(script: str, sbatch: str = "sbatch", env: dict[str, str] | None = None) -> str:
    """Submit a rendered script with `sbatch --parsable`; returns the job id."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        result = subprocess.run(
            [sbatch, "--parsable", path],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except FileNotFoundError as err:
        raise RuntimeError(f"`{sbatch}` not found: is SLURM installed on this login node?") from err
    finally:
        os.unlink(path)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return result.stdout.strip().split(";")[0]
