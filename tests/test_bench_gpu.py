"""`bench/gpu.py --cpu-smoke`: every case of the GPU benchmark runs at tiny size on CPU (real
shards on disk, the real engine) and prints the JSON lines a GPU run prints, with the GPU
figures marked "not measured"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_cpu_smoke_prints_every_case(sample_data):
    env = {**os.environ, "MEDFM_SAMPLE_DATA": str(sample_data), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    res = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke"], capture_output=True,
                         text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert all(line["bench"] == "gpu" and line["gpu"] == "not measured" for line in lines)
    cases = {}
    for line in lines:
        cases.setdefault(line["case"], []).append(line)
    assert set(cases) == {"decode_per_core", "decode_nvjpeg", "mae2d_vit_b16_224",
                          "mae3d_vit_b_96", "ddp_scaling"}  # fmt: skip
    storages = {line["storage"] for line in cases["decode_per_core"]}
    assert storages == {"npy_uint8", "png", "jpeg_pil", "jpeg_torchvision"}
    assert all(line["ours"] > 0 for line in cases["decode_per_core"])
    (mae2d,) = cases["mae2d_vit_b16_224"]
    assert mae2d["ours"] > 0 and mae2d["ceiling"] > 0 and 0 <= mae2d["data_wait_fraction"] <= 1
    assert mae2d["mfu"] == "not measured"  # no peak FLOP/s for a CPU
    assert mae2d["anchor_dailymae_a100"] == 1980.0 and mae2d["target"] == 4000.0
    assert mae2d["peak_memory_gib"] > 0
    (mae3d,) = cases["mae3d_vit_b_96"]
    assert mae3d["ours"] > 0 and mae3d["unit"] == "patches/s/gpu"
    assert cases["ddp_scaling"][0]["ours"] == "not measured"
    assert cases["decode_nvjpeg"][0]["ours"] == "not measured"
