"""`medfm synth generate` and `medfm synth audit`."""

from __future__ import annotations

import dataclasses
import json
import logging

import typer

app = typer.Typer(
    help="Generate synthetic data with diffusion models and audit it.", no_args_is_help=True
)


SET_OPTION = typer.Option(
    [], "--set", help="key=value override of the audit config (repeatable), e.g. k=10."
)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(
        ..., "--model", help="Exported diffusion model (folder, .safetensors or .json)."
    ),
    n: int = typer.Option(..., "--n", help="Number of samples to generate."),
    classes: list[str] = typer.Option(
        [], "--class", help="Class to generate (repeatable); default: all in turn."
    ),
    out: str = typer.Option(..., "--out", help="Destination shard set (folder or fsspec URL)."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (auto, ray://..., local)."
    ),
    tasks: int = typer.Option(0, help="Ray tasks (0: one per GPU, else per 2 CPUs)."),
    sampler: str = typer.Option("ddim", help="ddim or dpm (DPM-Solver++)."),
    steps: int = typer.Option(50, help="Sampler steps."),
    eta: float = typer.Option(0.0, help="DDIM eta (0 = deterministic)."),
    guidance_scale: float = typer.Option(
        None,
        "--guidance-scale",
        help="Classifier-free guidance w of a class-conditional latent diffusion model "
        "(0: unconditional, 1: conditional; default: the model's).",
    ),
    batch_size: int = typer.Option(64),
    seed: int = typer.Option(0, help="Base seed: sample i uses seed + i."),
    device: str = typer.Option("auto"),
    overwrite: bool = typer.Option(False, help="Replace an existing shard set at --out."),
    audit: bool = typer.Option(False, "--audit", help="Audit and withhold flagged samples."),
    real: str = typer.Option(None, help="Real training shards for --audit (default: the model's)."),
    audit_config: str = typer.Option(None, help="Audit YAML (default: synth/configs/audit.yaml)."),
    override: list[str] = SET_OPTION,
):
    """Sample a diffusion model into a shard set (rows marked synthetic, with provenance)."""
    from medfm.models.diffusion.sampling import SamplerSettings

    from .audit import load_audit_config
    from .generate import GenerateOptions, generate
    from .withhold import generate_audited

    if override and not audit:
        _fail(ValueError("--set overrides the audit config: use it with --audit"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = GenerateOptions(
        n=n,
        classes=list(classes),
        sampler=SamplerSettings(sampler, steps, eta),
        batch_size=batch_size,
        seed=seed,
        address=address,
        tasks=tasks,
        device=device,
        overwrite=overwrite,
        guidance_scale=guidance_scale,
    )
    try:
        if audit:
            cfg = load_audit_config(audit_config, override)
            header, report = generate_audited(model, out, opts, real, cfg)
            typer.echo(
                f"audit {report['verdict']}: withheld {report['memorization']['flagged']} "
                f"flagged samples; report in {out}/audit"
            )
        else:
            header = generate(model, out, opts)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"{out}: {header['num_samples']} synthetic samples written")


@app.command("audit")
def audit_cmd(
    synthetic: str = typer.Option(..., "--synthetic", help="Synthetic shard set."),
    real: str = typer.Option(..., "--real", help="Real training shard set (with held-out splits)."),
    out: str = typer.Option(None, help="Report folder (default: <synthetic>/audit)."),
    config: str = typer.Option(None, help="Audit YAML (default: synth/configs/audit.yaml)."),
    encoder: str = typer.Option(None, help="Exported medfm encoder for the feature space."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    override: list[str] = SET_OPTION,
):
    """Fidelity, diversity and memorization report with a pass/fail verdict (exit 1 on fail)."""
    from medfm.shards import ShardError

    from .audit import audit, load_audit_config

    try:
        cfg = load_audit_config(config, override)
        cfg = dataclasses.replace(cfg, encoder=encoder) if encoder else cfg
        report = audit(synthetic, real, out or f"{synthetic.rstrip('/')}/audit", cfg)
    except (ValueError, FileNotFoundError, ShardError) as e:  # e.g. a folder that is no set
        _fail(e)
    if as_json:
        typer.echo(json.dumps(report, indent=1, default=float))
    else:
        for c in report["checks"]:
            value = "n/a" if c["value"] is None else f"{c['value']:.4g}"  # no reference: fails
            typer.echo(f"{'ok  ' if c['pass'] else 'FAIL'} {c['name']}: {value}")
        mem = report["memorization"]
        typer.echo(f"memorization: {mem['flagged']} of {report['counts']['synthetic']} flagged")
        typer.echo(f"verdict: {report['verdict']}")
    raise typer.Exit(0 if report["verdict"] == "pass" else 1)
