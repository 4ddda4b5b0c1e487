"""`medfm ingest --dry-run` plans without writing; `--limit N` converts the first N items of each
source and the manifest says so. Real pydicom series plus PNGs, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from ingest_helpers import KEY, PYDICOM_FILES
from PIL import Image

from medfm.shards import Manifest, verify


def _inputs(tmp_path: Path) -> Path:
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(pngs / f"img{i}.png")
    (pngs / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (pngs / "notes.txt").write_text("not an image\n")
    spec = {
        "sources": [
            {"name": "series", "root": str(PYDICOM_FILES / "dicomdirtests"), "format": "dicom",
             "include": ["77654033/**", "98892001/**"]},
            {"name": "pngs", "root": str(pngs), "modality": "CR"},
        ],
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


def _ingest(medfm_exe: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}
    cmd = [medfm_exe, "ingest", *args, "--workers", "2", "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, medfm_exe):
    spec, dest = _inputs(tmp_path), tmp_path / "out"
    res = _ingest(medfm_exe, str(spec), "--out", str(dest), "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not dest.exists()  # not even bookkeeping
    plan = json.loads(res.stdout.splitlines()[-1])
    groups = {(g["source"], g["format"], g["kind"]): g["items"] for g in plan["groups"]}
    assert groups[("pngs", "png", "item")] == 6 and ("series", "dicom", "series") in groups
    # What discovery can tell is reported (a damaged PNG is only found when decoded).
    assert plan["quarantine"] == [
        {"source": "pngs", "reason": "unrecognised file format", "files": 1}
    ]
    assert plan["tasks"] >= 1 and plan["input_bytes"] > 0
    assert "[dry-run] plan:" in res.stdout and "nothing was written" in res.stdout


def test_limit_converts_the_first_items_of_each_source_and_the_manifest_says_so(
    tmp_path, medfm_exe
):
    spec, dest = _inputs(tmp_path), tmp_path / "out"
    res = _ingest(medfm_exe, str(spec), "--out", str(dest), "--limit", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    m = Manifest.open(str(dest))
    per_source = {}
    for row in m.rows():
        per_source[row["dataset"]] = per_source.get(row["dataset"], 0) + 1
    assert per_source["pngs"] == 2 and per_source["series"] <= 2, per_source
    assert m.header["attributes"]["ingest"]["limits"] == {"series": 2, "pngs": 2}
    assert verify(str(dest)).ok
    # the same two PNGs every time: the first two in path order
    values = sorted(int(s.data.max()) for s in _samples(dest) if s.dataset == "pngs")
    assert values == [0, 40], values


def _samples(dest: Path):
    from medfm.shards import ShardSet

    shards = ShardSet(str(dest))
    return [shards.read_sample(row) for row in shards.rows()]
