"""`medfm shards ...`: verify, stats and ls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from medfm.io import MissingExtraError, write_text

from .errors import ShardFormatError
from .manifest import Manifest
from .summary import LS_COLUMNS, ls_rows, stats
from .verify import verify

app = typer.Typer(help="Inspect and verify shard sets.", no_args_is_help=True)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A URL whose filesystem is not installed: one line naming the extra, exit 2."""
    try:
        yield
    except MissingExtraError as e:
        typer.echo(f"medfm shards: {e}", err=True)
        raise typer.Exit(2) from None


def _version_option() -> int:
    return typer.Option(
        None, "--version", min=1, help="A version of a set grown by --append (default: newest)."
    )


def _open(root: str, version: int | None) -> Manifest:
    """The manifest to show; a version the set does not hold is one line, exit 2."""
    try:
        return Manifest.open(root, version=version)
    except ShardFormatError as e:
        if version is None or "no version" not in str(e):
            raise
        typer.echo(f"medfm shards: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("verify")
def verify_cmd(
    root: str = typer.Argument(..., help="Shard-set folder or fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    version: int = _version_option(),
):
    """Re-hash every shard and check every manifest row; exit 1 on any mismatch."""
    with _one_line_errors():
        if version is not None:
            _open(root, version)  # a version the set does not hold: exit 2, not a report
        report = verify(root, version=version)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for w in report.warnings:
            typer.echo(f"WARNING {w}", err=True)
        for e in report.errors:
            typer.echo(f"ERROR {e}", err=True)
        status = "OK" if report.ok else f"FAILED ({len(report.errors)} errors)"
        typer.echo(
            f"{root}: {status}: {report.files_checked} files, {report.rows_checked} rows checked"
        )
    raise typer.Exit(0 if report.ok else 1)


@app.command("stats")
def stats_cmd(
    root: str = typer.Argument(..., help="Shard-set folder or fsspec URL."),
    as_json: bool = typer.Option(False, "--json"),
    version: int = _version_option(),
):
    """Counts per dataset, modality, split and label, plus bytes."""
    with _one_line_errors():
        m = _open(root, version)
        s = {**stats(m), "version": m.version, "latest_version": m.latest}
    if as_json:
        typer.echo(json.dumps(s, indent=1))
        return
    of = f", version {m.version} of {m.latest}" if m.latest > 1 else ""
    typer.echo(
        f"{root}: {s['samples']} samples, {s['patients']} patients, "
        f"{s['file_bytes'] / 1e6:.1f} MB in files, {s['synthetic']} synthetic{of}"
    )
    for col in ("dataset", "kind", "modality", "split", "label"):
        items = ", ".join(f"{k}: {v}" for k, v in s[f"by_{col}"].items()) or "-"
        typer.echo(f"  {col:<8} {items}")


@app.command("ls")
def ls_cmd(
    root: str = typer.Argument(..., help="Shard-set folder or fsspec URL."),
    split: str = typer.Option(None),
    kind: str = typer.Option(None),
    dataset: str = typer.Option(None),
    limit: int = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    version: int = _version_option(),
):
    """List samples with their location."""
    with _one_line_errors():
        m = _open(root, version)
        rows = ls_rows(m, split=split, kind=kind, dataset=dataset, limit=limit)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    typer.echo("\t".join(LS_COLUMNS))
    for r in rows:
        typer.echo(
            "\t".join("x".join(map(str, r[c])) if c == "shape" else str(r[c]) for c in LS_COLUMNS)
        )


@app.command("pairs")
def pairs_cmd(
    a: str = typer.Argument(..., help="First shard set (e.g. images)."),
    b: str = typer.Argument(..., help="Second shard set (e.g. EHR)."),
    window: str = typer.Option(None, help="Max time gap, e.g. 30d, 12h, 90m, 3600s."),
    out: str = typer.Option(None, help="Write the pairs as JSON lines to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Join two shard sets on patient pseudonym (optionally within a time window); count pairs."""
    from .pairs import find_pairs

    try:
        with _one_line_errors():
            report = find_pairs(a, b, window, collect=bool(out))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if out:
        write_text(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in report.rows))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    else:
        within = f" within {window}" if window else ""
        typer.echo(
            f"{report.pairs} pairs{within} over {report.patients_joined} shared patients "
            f"({report.patients_a} in A, {report.patients_b} in B); "
            f"split mismatches: {report.split_mismatches}"
        )
    raise typer.Exit(1 if report.split_mismatches else 0)
