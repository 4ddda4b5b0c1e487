"""`medfm hub`: push, pull and list checkpoints and adapters."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Push and pull checkpoints and adapters (local, fsspec or HF hub)")

HUB_OPTION = typer.Option(
    None, "--hub", help="Hub folder or URL, its scheme picks the backend (default: $MEDFM_HUB)."
)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def push(
    folder: str = typer.Argument(..., help="Folder to push (safetensors, JSON, README...)."),
    repo: str = typer.Argument(..., help="REPO[@REV] or hf://REPO[@REV]; REV defaults to main."),
    hub: str = HUB_OPTION,
):
    """Push a folder as a new immutable revision and point REV at it."""
    from medfm.finetune import hub as hub_api

    try:
        rev_id = hub_api.push(folder, repo, hub=hub)
    except hub_api.HubError as e:
        _fail(e)
    typer.echo(f"{repo} -> {rev_id}")


@app.command()
def pull(
    repo: str = typer.Argument(..., help="REPO[@REV] or hf://REPO[@REV] (REV: name or id)."),
    to: str = typer.Option(..., "--to", help="Destination folder."),
    hub: str = HUB_OPTION,
):
    """Download a revision, verifying every file's sha256; refuses pickle files."""
    from medfm.finetune import hub as hub_api

    try:
        report = hub_api.pull(repo, to, hub=hub)
    except hub_api.HubError as e:
        _fail(e)
    typer.echo(
        f"{report.repo}@{report.revision} -> {report.path} ({len(report.files)} files, "
        f"{report.downloaded_bytes} bytes downloaded, {report.resumed_bytes} resumed)"
    )


@app.command("ls")
def ls_cmd(hub: str = HUB_OPTION, as_json: bool = typer.Option(False, "--json")):
    """List repos and their named revisions."""
    from medfm.finetune import hub as hub_api

    try:
        listing = hub_api.ls(hub)
    except hub_api.HubError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(listing, indent=1))
        return
    for repo, refs in listing.items():
        for name, rev_id in sorted(refs.items()):
            typer.echo(f"{repo}@{name}\t{rev_id}")
