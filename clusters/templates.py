"""Packaged cluster files (sbatch templates, Ray/KubeRay YAML) and their Jinja2 rendering."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2

PACKAGE = "medfm.clusters"


def template_path(relative: str) -> Path:
    """Path of a file shipped under `clusters/` (works for editable and wheel installs)."""
    path = Path(str(resources.files(PACKAGE).joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"medfm.clusters ships no file {relative!r} (looked at {path})")
    return path


def render(relative: str, **values: object) -> str:
    """Render a packaged `.j2` template; a missing value is an error, never an empty string."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_path(relative).parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Shell uses `{#` (`${#ARRAY[@]}`), so Jinja comments get delimiters shell never has.
        comment_start_string="<#--",
        comment_end_string="--#>",
        autoescape=False,  # shell scripts, not HTML: quoting is done with shlex by the caller
    )
    return env.get_template(Path(relative).name).render(**values)
