"""`medfm finetune --config CONFIG.yaml`, `medfm finetune export RUN --out DIR` and
`medfm finetune evaluate MODEL --config CONFIG.yaml`."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Fine-tune adapters and heads, evaluate and export")


@app.callback(invoke_without_command=True)
def finetune(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", help="Fine-tuning config YAML."),
    override: list[str] = typer.Option([], "--set", help="key=value overrides (repeatable)."),
):
    """Fine-tune an encoder on a labeled shard set; writes metrics.json and a checkpoint."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    from medfm.config import ConfigError
    from medfm.finetune.config import load_config
    from medfm.finetune.train import run

    try:
        cfg = load_config(config, override)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    out = run(cfg)
    typer.echo(f"run written to {out}")


@app.command("export")
def export_cmd(
    run_dir: str = typer.Argument(..., help="A finished `medfm finetune` run folder."),
    out: str = typer.Option(..., "--out", help="Export folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Export adapter (PEFT format), head, medfm.json and a model card."""
    from medfm.finetune.export import ExportError, export

    try:
        path = export(run_dir, out, overwrite)
    except ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"exported to {path}")


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(..., help="An export folder or a hub://repo@rev reference."),
    config: str = typer.Option(..., "--config", "-c", help="Config naming the shards and task."),
    split: str = typer.Option("test", "--split"),
    roc: str = typer.Option(None, "--roc", help="Write the ROC curve to this PNG."),
    override: list[str] = typer.Option([], "--set", help="key=value overrides (repeatable)."),
):
    """Score an exported model on a split; prints its metrics (95% CIs) as one JSON line."""
    from medfm.config import ConfigError
    from medfm.finetune.config import load_config
    from medfm.finetune.evaluate import evaluate_export
    from medfm.finetune.export import ExportError

    try:
        metrics = evaluate_export(model, load_config(config, override), split, roc)
    except (ConfigError, ExportError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps(metrics))
