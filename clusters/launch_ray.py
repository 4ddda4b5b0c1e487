"""Submit any medfm command to a running Ray cluster through the Ray Jobs API.

The job's `runtime_env` pins the medfm version of the submitting machine:
- `pin="pip"` asks Ray to build the job environment with `medfm==<version>` (a no-op where the
  cluster image already has it, an install from the package index otherwise);
- `pin="check"` uses the cluster's own environment (for air-gapped clusters and images built
  with medfm inside) and only checks the version.
Either way the entrypoint (`medfm.clusters.run`) refuses to start on a version mismatch.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from medfm import __version__

from .command import needs_ray_address, normalize_command

PIN_MODES = ("pip", "check")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class RayJobRequest:
    """One `medfm launch ray` submission."""

    address: str
    command: list[str]
    pin: str = "pip"
    working_dir: str | None = None  # uploaded to the cluster; specs with relative paths live here
    env: dict[str, str] = field(default_factory=dict)  # plain settings only, never secrets
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_resources: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.pin not in PIN_MODES:
            raise ValueError(f"--pin must be one of {PIN_MODES}, got {self.pin!r}")
        normalize_command(self.command)


def dashboard_url(address: str) -> str:
    """The Jobs API speaks HTTP to the dashboard (port 8265), not to the GCS port."""
    if address.startswith("ray://"):
        raise ValueError(
            f"{address!r} is a Ray Client address; `medfm launch ray` needs the dashboard "
            "address of the head, e.g. http://HEAD:8265"
        )
    return address if "://" in address else f"http://{address}"


def runtime_env(req: RayJobRequest) -> dict:
    env: dict = {"env_vars": {"MEDFM_VERSION": __version__, **req.env}}
    if req.pin == "pip":
        # pip_check off: the base image may carry unrelated packages with loose pins.
        env["pip"] = {"packages": [f"medfm=={__version__}"], "pip_check": False}
    if req.working_dir:
        env["working_dir"] = req.working_dir
    return env


def entrypoint(command: list[str]) -> str:
    """`python -m medfm.clusters.run` with the pinned version, then the medfm arguments.

    Ray stages get `--address auto`: inside a Ray job that is the job's own cluster, where a bare
    `ray.init(num_cpus=...)` would fail."""
    args = normalize_command(command)[1:]
    if needs_ray_address(command):
        args += ["--address", "auto"]
    guard = ["python", "-m", "medfm.clusters.run", "--expect-version", __version__, "--"]
    return shlex.join(guard + args)


def submit_ray_job(req: RayJobRequest) -> str:
    """Submit and return the submission id (the job runs on; see `follow`)."""
    from ray.job_submission import JobSubmissionClient

    req.validate()
    client = JobSubmissionClient(dashboard_url(req.address))
    return client.submit_job(
        entrypoint=entrypoint(req.command),
        runtime_env=runtime_env(req),
        submission_id=req.submission_id,
        entrypoint_num_cpus=req.entrypoint_num_cpus,
        entrypoint_resources=req.entrypoint_resources or None,
        metadata={"medfm_version": __version__, "launched_by": "medfm launch ray"},
    )


def follow(address: str, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream the job's log to `out` as it is written, until the job ends; returns its status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_url(address))

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):  # ends when the job does
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL:  # the log can close a moment before the status is final
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status
