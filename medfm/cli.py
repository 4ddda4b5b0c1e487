"""The `medfm` command line: one Typer app, one sub-app per stage.

Stage CLIs import their heavy dependencies (torch, ray, ...) inside commands, so `medfm --help`
stays fast.
"""

from __future__ import annotations

import typer

from medfm import __version__
from medfm.clusters.cli import app as launch_app
from medfm.finetune.cli import app as finetune_app
from medfm.finetune.hub_cli import app as hub_app
from medfm.ingest.cli import app as ingest_app
from medfm.io import MissingExtraError
from medfm.pretrain.cli import app as pretrain_app
from medfm.shards.cli import app as shards_app
from medfm.synth.cli import app as synth_app

app = typer.Typer(
    help="medfm: data-centric pretraining for medical foundation models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(ingest_app, name="ingest")
app.add_typer(shards_app, name="shards")
app.add_typer(pretrain_app, name="pretrain")
app.add_typer(synth_app, name="synth")
app.add_typer(finetune_app, name="finetune")
app.add_typer(hub_app, name="hub")
app.add_typer(launch_app, name="launch")


@app.command()
def demo(
    out: str = typer.Option("demo-out", help="Folder for everything the demo writes."),
    overwrite: bool = typer.Option(True, help="Replace an earlier demo's output."),
    quick: bool = typer.Option(False, help="Tiny step counts and fewer images (the test's)."),
    address: str = typer.Option(
        None,
        envvar="RAY_ADDRESS",
        help="A running Ray cluster (HEAD:6379, auto, ray://...): ingest tasks and training "
        "ranks run on its nodes; --out must then be on storage every node mounts.",
    ),
):
    """Run the main job end to end on embedded defaults (local Ray, local disk, a local hub) and
    real data: pip-shipped files, plus MEDFM_SAMPLE_DATA when set. With --address, the same job
    on a Ray cluster (docs/clusters.md)."""
    from medfm.demo import run_demo

    run_demo(out, overwrite=overwrite, quick=quick, address=address)


@app.command()
def version():
    """Print the medfm version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except MissingExtraError as e:  # any stage given a URL whose filesystem is not installed
        typer.echo(f"medfm: {e}", err=True)
        raise SystemExit(2) from None
