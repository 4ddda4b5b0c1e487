"""A placeholder sub-command for stages that have not landed yet."""

from __future__ import annotations

import typer


def stub_app(stage: str, help_text: str) -> typer.Typer:
    """A Typer app that exists (so `medfm --help` lists it) and says it is not yet available."""
    app = typer.Typer(help=f"{help_text} (not yet available)")

    @app.callback(
        invoke_without_command=True,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def _not_yet(ctx: typer.Context) -> None:
        typer.echo(f"medfm {stage}: not yet available in this version", err=True)
        raise typer.Exit(2)

    return app
