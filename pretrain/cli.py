"""`medfm pretrain --config CONFIG.yaml [key=value ...] [--resume]`."""

from __future__ import annotations

from pathlib import Path

import click
import typer
from typer.core import TyperGroup


class OverridesGroup(TyperGroup):
    """`medfm pretrain` has no sub-commands: trailing words are `key=value` overrides, which a
    plain group would try to resolve as command names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return click.Command.parse_args(self, ctx, args)

    def invoke(self, ctx: click.Context):
        return click.Command.invoke(self, ctx)


app = typer.Typer(
    cls=OverridesGroup,
    help="Pretrain foundation models (MAE, contrastive, diffusion) on shard sets.",
)

EXAMPLES = Path(__file__).parent / "configs"


@app.callback(
    invoke_without_command=True,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
)
def pretrain(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (see --list)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from out_dir's last checkpoint."),
    force_resume: bool = typer.Option(
        False, "--force-resume", help="Resume even if the checkpoint's config differs."
    ),
    list_: bool = typer.Option(False, "--list", help="List encoders, objectives, example configs."),
    smoke: bool = typer.Option(
        False, "--smoke", help="Apply the recipe's `smoke:` overrides (a few tiny CPU steps)."
    ),
) -> None:
    """Train an encoder on shard sets. Extra `key=value` arguments override the config, e.g.
    `train.max_steps=2000 data.batch_size=64 objectives[0].mask_ratio=0.6`."""
    from medfm.config import ConfigError
    from medfm.pretrain.config import load_config

    if list_:
        from medfm.models import ENCODERS
        from medfm.pretrain.objectives import OBJECTIVES

        typer.echo(f"encoders:   {', '.join(ENCODERS.names())}")
        typer.echo(f"objectives: {', '.join(OBJECTIVES.names())}")
        typer.echo(f"configs:    {', '.join(sorted(p.name for p in EXAMPLES.glob('*.yaml')))}")
        typer.echo(f"            (in {EXAMPLES})")
        return
    if config is None:
        typer.echo("medfm pretrain: --config is required (try --list)", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_config(config, ctx.args, smoke=smoke)
    except ConfigError as e:
        typer.echo(f"medfm pretrain: bad config: {e}", err=True)
        raise typer.Exit(2) from None
    from medfm.pretrain.checkpoint import ResumeError
    from medfm.pretrain.engine import NonFiniteLossError
    from medfm.pretrain.train import run

    try:
        summary = run(cfg, resume=resume, force_resume=force_resume)
    except (ConfigError, ResumeError, NonFiniteLossError, ValueError) as e:
        typer.echo(f"medfm pretrain: {e}", err=True)
        raise typer.Exit(1) from None
    if summary.get("export"):  # the encoder file, or the export folder (diffusion: no encoder)
        typer.echo(f"exported: {summary['export']}")
