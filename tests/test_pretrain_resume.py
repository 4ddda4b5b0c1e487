"""Checkpoints in real processes: kill -9 and --resume reach the uninterrupted run's weights;
NaN stops with the step and keeps the last good checkpoint; a changed config is refused;
exports load from safetensors + sidecar alone; 2-process DDP (gloo) sees disjoint data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clusters_helpers import rendezvous_port
from pretrain_helpers import DECODER, TINY, base_config, pneumonia_shards, run_cli, write_yaml
from safetensors.torch import load_file

from medfm.pretrain.checkpoint import ResumeError
from medfm.pretrain.config import load_config
from medfm.pretrain.engine import NonFiniteLossError
from medfm.pretrain.train import RENDEZVOUS_ENV, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def mae_config(tmp: Path, shards: Path, name: str, **train) -> Path:
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    tree = base_config(tmp, shards, model, [{"name": "mae", **DECODER}], **train)
    tree["out_dir"] = str(tmp / name)
    tree["data"]["num_workers"] = 2  # resume must be exact with worker processes too
    return write_yaml(tree, tmp / f"{name}.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_data):
    return pneumonia_shards(sample_data, tmp_path_factory.mktemp("pm") / "pm", n=128)


def test_kill9_then_resume_matches_uninterrupted(tmp_path, shards):
    # 128 samples / 16 per batch = 8 steps an epoch: the run crosses epoch boundaries and is
    # killed mid-epoch.
    train = {"max_steps": 60, "checkpoint_every": 5}
    run(load_config(mae_config(tmp_path, shards, "ref", **train)))  # in-process, 1 thread
    cfg = mae_config(tmp_path, shards, "cut", **train)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "medfm"
    proc = subprocess.Popen([str(exe), "pretrain", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("step0000015.ckpt")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "export").exists(), "run finished before the kill"
    saved = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= saved < 60  # last.ckpt is written just after the step file
    res = run_cli(["--config", str(cfg), "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(tmp_path / "ref" / "export" / "encoder.safetensors")
    b = load_file(tmp_path / "cut" / "export" / "encoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same checkpoint under a changed config is refused, naming the change, unless forced
    with pytest.raises(ResumeError, match=r"different config.*train\.lr"):
        run(load_config(cfg, ["train.lr=0.5"]), resume=True)
    run(load_config(cfg, ["train.max_steps=62"]), resume=True, force_resume=True)
    last = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert last == 62


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, shards):
    cfg = mae_config(tmp_path, shards, "nan", max_steps=8, checkpoint_every=1, lr=1e30,
                     warmup_steps=1)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="train.on_nan=stop") as err:
        run(load_config(cfg))
    ck = torch.load(tmp_path / "nan/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    stopped = int(re.search(r"loss became \S+ at step (\d+)", str(err.value)).group(1))
    assert ck["global_step"] == stopped
    # skip instead of stop: the run carries on past the bad batches
    skip = load_config(cfg, ["train.on_nan=skip", f"out_dir={tmp_path / 'skip'}"])
    run(skip)
    ck = torch.load(tmp_path / "skip/checkpoints/last.ckpt", weights_only=True)
    assert ck["medfm"]["skipped_steps"] > 0


def test_export_loads_from_safetensors_and_sidecar_alone(tmp_path, shards):
    from medfm.models.export import ExportError, load_encoder
    from medfm.pretrain.train import build

    cfg_path = mae_config(tmp_path, shards, "exp", max_steps=3, ema_decay=0.5)
    run(load_config(cfg_path))
    export = tmp_path / "exp" / "export"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in ("encoder.json", "encoder.safetensors"):
        (moved / f).write_bytes((export / f).read_bytes())
    encoder, sidecar = load_encoder(moved / "encoder.json")
    assert sidecar["architecture"]["name"] == "vit2d"
    assert sidecar["preprocessing"]["image_size"] == 28
    assert sidecar["preprocessing"]["source"]["modality"] == "DX"
    assert list(sidecar["data"]["manifests"].values())[0]  # manifest hash recorded
    assert sidecar["training"]["ema_decay"] == 0.5
    # the exported weights are the EMA weights of the checkpointed module
    module, _ = build(load_config(cfg_path))
    state = torch.load(tmp_path / "exp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(encoder(x), module.export_encoder().eval()(x))
    # a corrupted weights file is refused, by hash, before any tensor is used
    blob = bytearray((moved / "encoder.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (moved / "encoder.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ExportError, match="sha256 does not match"):
        load_encoder(moved / "encoder.json")
    side = json.loads((moved / "encoder.json").read_text())
    side["format"] = "something-else"
    (moved / "encoder.json").write_text(json.dumps(side))
    with pytest.raises(ExportError, match="not a medfm-encoder sidecar"):
        load_encoder(moved / "encoder.json")


def run_ranks(args: list[str], world: int, logs: Path, timeout_s: float = 300) -> None:
    """`medfm pretrain ARGS` once per rank of one node, started as torchrun or srun start them
    (LOCAL_RANK set, so Lightning launches nothing itself), each rank with its own log, so a
    hang names the rank that hung."""
    exe = Path(sys.executable).parent / "medfm"
    layout = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(rendezvous_port()),
              "NODE_RANK": "0", "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = []
    for rank in range(world):
        env = {**os.environ, **layout, "LOCAL_RANK": str(rank)}
        cmd = [str(exe), "pretrain", *args]
        with (logs / f"rank{rank}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = "\n".join(f"-- rank {r}:\n{(logs / f'rank{r}.log').read_text()[-3000:]}"
                     for r in range(world))  # fmt: skip
    assert codes == [0] * world, f"exit codes {codes} (None: past {timeout_s} s)\n{text}"


@pytest.mark.parametrize("launcher", ["lightning", "external"])
def test_ddp_two_processes_gloo_disjoint_data(tmp_path, shards, launcher):
    """Started by Lightning's own launcher (rank 0 re-runs the command for rank 1), or as
    torchrun and srun start ranks."""
    cfg = mae_config(tmp_path, shards, "ddp", max_steps=4)
    args = ["--config", str(cfg), "train.strategy=ddp", "train.devices=2",
            "train.accelerator=cpu", "train.ledger=true", "data.num_workers=0"]  # fmt: skip
    if launcher == "external":
        run_ranks(args, 2, tmp_path)
    else:
        res = run_cli(args, env={**os.environ, "MASTER_PORT": str(rendezvous_port())})
        assert res.returncode == 0, res.stderr[-3000:]
    ledger = tmp_path / "ddp" / "ledger"
    seen = [
        [line.split("\t")[1] for line in (ledger / f"rank{r}.txt").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(seen[0]) == len(seen[1]) == 4 * 16
    assert not set(seen[0]) & set(seen[1]), "ranks trained on the same samples"
    assert (tmp_path / "ddp" / "export" / "encoder.safetensors").exists()


def test_an_in_process_ddp_run_leaves_no_rendezvous_in_the_environment(tmp_path, shards):
    """Lightning's launcher writes LOCAL_RANK, NODE_RANK and MASTER_* into the calling process
    and leaves them there: a 2-process run started from this process afterwards took itself for
    an externally started rank 0 and waited for a rank 1 nobody started (two CI hangs)."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    overrides = ["train.strategy=ddp", "train.devices=1", "train.accelerator=cpu",
                 "data.num_workers=0"]  # fmt: skip
    run(load_config(mae_config(tmp_path, shards, "one", max_steps=2), overrides))
    assert {k: os.environ.get(k) for k in RENDEZVOUS_ENV} == before
