"""`medfm ingest SPEC.yaml --out DEST [key=value ...] [--address RAY_ADDRESS] [--workers N]
[--resume] [--append [--refit]] [--dry-run] [--limit N]`."""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import typer

app = typer.Typer(
    help="Convert DICOM, NIfTI, NRRD, MHA, PNG/JPEG/TIFF (and signals/EHR) into a shard set "
    "on Ray: de-identified, split by patient, resumable. See docs/ingest.md.",
    no_args_is_help=True,
)


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def ingest(
    spec: Path = typer.Argument(..., help="Dataset spec (YAML); see medfm/ingest/specs/."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides of the spec, e.g. split.seed=1 sources[0].format=png."
    ),
    out: str = typer.Option(..., "--out", help="Destination shard-set folder or fsspec URL."),
    address: str = typer.Option(
        None, "--address", help="Existing Ray cluster (ray://... or auto)."
    ),
    workers: int = typer.Option(None, "--workers", min=1, help="Parallel tasks (default: cores)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted job in --out."),
    append: bool = typer.Option(
        False, "--append", help="Add new inputs to the set in --out as a new manifest version."
    ),
    refit: bool = typer.Option(
        False, "--refit", help="With --append: fit the CT statistics again over every input."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress line."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Discover, group and plan only; print the plan, write nothing."
    ),
    limit: int = typer.Option(
        None, "--limit", min=1, help="Only the first N items of each source (to try a spec)."
    ),
) -> None:
    """Run an ingest job. The de-identification key comes from MEDFM_DEID_KEY or a key file."""
    from medfm.config import ConfigError

    from .bookkeeping import ResumeError
    from .job import run_ingest
    from .load import load_spec
    from .privacy import DeidKeyError
    from .progress import emit, job_log
    from .registry import IngestError
    from .sources import check_destination

    expected = (ConfigError, ResumeError, DeidKeyError, IngestError)

    try:
        if refit and not append:
            raise ConfigError("--refit refits what an --append keeps; give it with --append")
        job_spec = load_spec(spec, overrides or ())
        for source in job_spec.sources if limit else ():
            source.limit = limit
        check_destination(job_spec, out)
        if dry_run:
            from .dryrun import describe
            from .dryrun import dry_run as plan_job

            plan = plan_job(job_spec, address=address, workers=workers)
            typer.echo(describe(plan))
            typer.echo(json.dumps(plan, sort_keys=True))
            return
    except expected as e:
        typer.echo(f"medfm ingest: {e}", err=True)
        raise typer.Exit(2) from None
    with ExitStack() as stack:
        try:  # every line from here on also lands in <out>/_logs/
            log = stack.enter_context(job_log(out))
        except OSError as e:  # e.g. a path under a regular file, a read-only store
            why = e.strerror or e
            typer.echo(f"medfm ingest: --out {out}: cannot write there ({why})", err=True)
            raise typer.Exit(2) from None
        try:
            summary = run_ingest(
                job_spec, out, address=address, workers=workers, resume=resume, progress=not quiet,
                append=append, refit=refit,
            )  # fmt: skip
        except expected as e:
            emit(f"medfm ingest: {e}")
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - one line here, the traceback in the log
            emit(_failure(e, job_spec, log))
            raise typer.Exit(3) from None
        emit(summary.line(), stream=sys.stdout)
        emit(json.dumps(dataclasses.asdict(summary), sort_keys=True), stream=sys.stdout)
        if append and summary.items == 0:  # every input is in the set already
            emit(f"medfm ingest: nothing new to append; the set stays at version {summary.version}")
            return
        if summary.written == 0:
            emit("medfm ingest: no sample was written (see quarantine.jsonl)")
            raise typer.Exit(1)


def _failure(e: Exception, spec, log: str) -> str:
    """The one stderr line of an unexpected error (the traceback goes to the log), with input
    paths keyed as in the records: the key may be what failed, so without it they are masked."""
    from .privacy import Keyring
    from .progress import failure_line

    try:
        keyring = Keyring.load(spec.deid.key_file or None)
    except Exception:  # noqa: BLE001 - masked paths, then
        keyring = None
    return failure_line(e, spec, keyring, log)
