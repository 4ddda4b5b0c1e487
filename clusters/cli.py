"""`medfm launch ray|slurm -- <medfm command>`: the same command, on a cluster."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Launch any medfm command on a Ray cluster (Jobs API) or a SLURM allocation.",
    no_args_is_help=True,
)
# Everything after `--` is the medfm command; its own options must not be parsed here.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} {pair!r} must look like KEY=VALUE")
        out[key] = value
    return out


@app.command("ray", context_settings=PASSTHROUGH)
def ray_cmd(
    ctx: typer.Context,
    address: str = typer.Option(
        ..., envvar="RAY_DASHBOARD_ADDRESS", help="Head dashboard, e.g. http://HEAD:8265."
    ),
    pin: str = typer.Option(
        "pip",
        help="pip: runtime_env installs medfm==<this version>; "
        "check: use the cluster's medfm and only check its version.",
    ),
    working_dir: str = typer.Option(
        None, help="Local folder uploaded with the job (specs, configs); never put secrets in it."
    ),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job (no secrets)."),
    submission_id: str = typer.Option(None, help="Job id to use (default: Ray picks one)."),
    entrypoint_num_cpus: float = typer.Option(None, help="CPUs reserved for the driver."),
    entrypoint_resource: list[str] = typer.Option(
        [], "--entrypoint-resource", help="NAME=AMOUNT custom resource the driver needs."
    ),
    wait: bool = typer.Option(True, help="Stream the job log and exit with its status."),
):
    """Submit `-- medfm ...` through the Ray Jobs API, pinned to this medfm version."""
    from .launch_ray import RayJobRequest, follow, submit_ray_job

    req = RayJobRequest(
        address=address,
        command=list(ctx.args),
        pin=pin,
        working_dir=working_dir,
        env=_parse_pairs(env, "--env"),
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_resources={
            k: float(v)
            for k, v in _parse_pairs(entrypoint_resource, "--entrypoint-resource").items()
        },
    )
    try:
        job_id = submit_ray_job(req)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"submitted Ray job {job_id} to {address}", err=True)
    if not wait:
        typer.echo(job_id)
        return
    status = follow(address, job_id)
    typer.echo(f"Ray job {job_id}: {status}", err=True)
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@app.command("slurm", context_settings=PASSTHROUGH)
def slurm_cmd(
    ctx: typer.Context,
    nodes: int = typer.Option(1, help="Number of nodes."),
    gpus_per_node: int = typer.Option(0, help="GPUs per node (0 on CPU-only partitions)."),
    tasks_per_node: int = typer.Option(None, help="Default: one per GPU, or 1."),
    cpus_per_task: int = typer.Option(8),
    mem: str = typer.Option(None, help="Memory per node, e.g. 200G."),
    time: str = typer.Option("24:00:00", help="Time limit (D-HH:MM:SS)."),
    partition: str = typer.Option(None),
    account: str = typer.Option(None),
    job_name: str = typer.Option("medfm"),
    log_dir: str = typer.Option("slurm-logs", help="Where %x-%j.out logs go (created)."),
    signal_grace: int = typer.Option(90, help="Seconds before the limit that SIGUSR1 is sent."),
    setup: list[str] = typer.Option(
        [], "--setup", help="Shell line run first, e.g. 'source .venv/bin/activate'."
    ),
    sbatch_opt: list[str] = typer.Option([], "--sbatch", help="Extra '--name=value' option."),
    template: str = typer.Option("auto", help="auto | train (Lightning) | ray (Ray on SLURM)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script, submit nothing."),
):
    """Render an sbatch script for `-- medfm ...` and submit it with sbatch."""
    from .command import SingleWriterRefused
    from .launch_slurm import SlurmJob, render_sbatch, submit

    job = SlurmJob(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time=time,
        partition=partition,
        account=account,
        job_name=job_name,
        log_dir=str(Path(log_dir).resolve()),
        signal_grace_s=signal_grace,
        setup=setup,
        extra_sbatch=sbatch_opt,
    )
    try:
        script = render_sbatch(job, list(ctx.args), template=template)
    except SingleWriterRefused as err:
        typer.echo(f"medfm launch slurm: refused: {err}", err=True)
        raise typer.Exit(2) from err
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if dry_run:
        typer.echo(script, nl=False)
        return
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    try:
        job_id = submit(script)
    except RuntimeError as err:
        typer.echo(f"medfm launch slurm: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(
        f"submitted SLURM job {job_id}; log: {job.log_dir}/{job_name}-{job_id}.out", err=True
    )
    typer.echo(job_id)
