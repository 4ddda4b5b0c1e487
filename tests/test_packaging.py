"""The package installs as one `medfm` namespace, from a wheel as well as editable."""

from __future__ import annotations

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


def source_files() -> list[str]:
    """Every package file as the wheel must name it: medfm/<stage>/..., medfm/<core>/..."""
    names = [
        f"medfm/{p.relative_to(REPO / 'medfm').as_posix()}" for p in (REPO / "medfm").rglob("*.py")
    ]
    for stage in STAGES:
        names += [f"medfm/{p.relative_to(REPO).as_posix()}" for p in (REPO / stage).rglob("*.py")]
    return sorted(n for n in names if "__pycache__" not in n)


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.startswith("medfm-")}
    assert tops == {"medfm"}, f"top-level entries besides medfm: {tops - {'medfm'}}"
    missing = [n for n in source_files() if n not in names]
    assert not missing, f"package files missing from the wheel: {missing}"
    assert "medfm/ingest/specs/xray_png.yaml" in names
    unwanted = [
        n
        for n in names
        if n.rsplit("/", 1)[-1] in ("setup.py", "conftest.py", "Makefile")
        or n.startswith(("medfm/tests/", "medfm/bench/", "medfm/.ci", "medfm/docs/"))
        or "/test_" in n
    ]
    assert not unwanted, f"not package code, yet in the wheel: {unwanted}"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medfm = medfm.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def fresh_venv(where: Path) -> Path:
    """A new venv that sees this environment's dependencies but not its editable medfm.

    A path line in a .pth file only extends sys.path; the .pth files inside that folder (the
    editable install's finder among them) are not run, so `medfm` can come only from the wheel.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site,) = where.glob("lib/python*/site-packages")
    (site / "dependencies.pth").write_text(deps + "\n")
    return where / "bin" / "python"


def test_wheel_installs_and_every_module_imports_in_a_fresh_venv(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    modules = [
        n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in source_files()
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import medfm\n"
        "print(medfm.__file__)\n"
    )
    out = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith(str(tmp_path / "venv")), out.stdout
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    for taken in ("ingest", "shards", "synth", "finetune", "pretrain", "clusters"):
        assert not (site / taken).exists(), f"a top-level {taken!r} package was installed"
    cli = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "medfm"), "--help"], capture_output=True, text=True
    )
    assert cli.returncode == 0 and " ingest " in cli.stdout, cli.stderr
