"""The package installs as one `medfm` namespace, from a wheel as well as editable."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "shards", "pretrain", "synth", "finetune", "clusters")
SUBCOMMANDS = ("ingest", "shards", "pretrain", "synth", "finetune", "hub", "launch", "demo")


def test_cli_help_lists_every_subcommand(medfm_exe):
    out = subprocess.run([medfm_exe, "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert f" {name} " in out.stdout, f"{name} missing from medfm --help"


def test_editable_install_maps_stage_folders():
    import medfm
    import medfm.shards

    assert Path(medfm.shards.__file__).parent == REPO / "shards"
    assert Path(medfm.__file__).parent == REPO / "medfm"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("medfm-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("medfm-")}
    assert tops == {"medfm"}, f"top-level entries besides medfm: {tops - {'medfm'}}"
    for stage in STAGES:
        assert f"medfm/{stage}/__init__.py" in names
    assert "medfm/__init__.py" in names and "medfm/cli.py" in names
    assert "medfm/shards/manifest.py" in names
    assert not [n for n in names if n.startswith(("medfm/tests/", "medfm/bench/", "medfm/.ci"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medfm = medfm.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_wheel_install_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import medfm, medfm.shards, medfm.ingest, medfm.pretrain, medfm.synth, "
        "medfm.finetune, medfm.clusters, medfm.cli; print(medfm.shards.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(target / "medfm" / "shards"))
    for taken in ("ingest", "shards", "synth", "finetune"):
        assert not (target / taken).exists()
