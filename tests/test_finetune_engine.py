"""Fine-tuning runs on pretraining's engine (Lightning): the same steps as a plain AdamW loop,
the configured precision, strategy and gradient clipping are what the Trainer ran with, and a
2-process DDP fine-tune over gloo on real chest X-rays splits the data between its ranks and
lands where one process does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from clusters_helpers import rendezvous_port
from test_finetune import ENC2D, needs_pneumonia, write_encoder, write_pneumonia

from medfm.engine import precision_for
from medfm.finetune.config import load_config
from medfm.finetune.fit import fit_epochs, reset_norm_stats, set_lr
from medfm.finetune.model import FinetuneModel, param_groups
from medfm.finetune.tasks import task_for
from medfm.models import build_encoder
from medfm.models.contract import Contract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY2D = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
          "img_size": 32, "patch_size": 8}  # fmt: skip
BASE = {"name": "x", "out_dir": "o", "encoder": "e", "data": {"shards": "s"}, "mode": "full",
        "task": {"type": "binary", "label_names": ["a", "b"]}}  # fmt: skip


def tiny_fit(overrides: list[str], hook=None) -> tuple[dict, FinetuneModel, dict]:
    """fit_epochs on 41 fixed samples in batches of 8 (the last ragged one of 1 is skipped)."""
    cfg = load_config(None, base=BASE, overrides=["train.epochs=3", "train.device=cpu", *overrides])
    torch.manual_seed(1)
    enc = build_encoder(TINY2D)
    task = task_for(cfg.task)
    model = FinetuneModel(enc, task.build_head(enc), task)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    if hook is not None:
        model.head.fc.register_forward_hook(hook)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(41, 1, 32, 32, generator=g), torch.randint(0, 2, (41,), generator=g)

    def batches():
        return iter([(x[i : i + 8], y[i : i + 8]) for i in range(0, 41, 8)])

    def score() -> float:
        with torch.no_grad():
            return float(-model.eval()(x).std())

    fit = fit_epochs(model, model, batches, score, cfg, torch.device("cpu"), steps_per_epoch=6)
    return fit, model, start


def test_the_lightning_fit_takes_the_steps_of_a_plain_adamw_loop():
    """The loop fine-tuning ran before it moved onto Lightning, written out: warmup + cosine
    per step, layer-decayed groups, the batch of one skipped, the best epoch restored."""
    fit, model, _ = tiny_fit(["train.warmup_epochs=0.5"])
    cfg = load_config(None, base=BASE, overrides=["train.epochs=3", "train.warmup_epochs=0.5"])
    t = cfg.train
    torch.manual_seed(1)
    enc = build_encoder(TINY2D)
    task = task_for(cfg.task)
    ref = FinetuneModel(enc, task.build_head(enc), task)
    opt = torch.optim.AdamW(param_groups(ref, "full", t.lr, t.weight_decay, t.layer_decay))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(41, 1, 32, 32, generator=g), torch.randint(0, 2, (41,), generator=g)
    step, scores, states = 0, [], []
    for _ in range(t.epochs):
        ref.train()
        reset_norm_stats(ref.head)
        for i in range(0, 40, 8):  # sample 40 alone is the skipped batch of one
            set_lr(opt, step, 3 * 6, 3, t.lr)
            loss = task.loss(ref(x[i : i + 8]), y[i : i + 8])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            scores.append(float(-ref.eval()(x).std()))
        states.append({k: v.clone() for k, v in ref.state_dict().items()})
    assert [h["val_score"] for h in fit["history"]] == scores
    best = max(range(3), key=lambda e: scores[e])
    assert fit["best_epoch"] == best + 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[best][k]), k


def test_the_trainer_runs_with_the_configured_precision_and_clipping():
    seen: set[torch.dtype] = set()

    def dtype_hook(module, args, out):
        if module.training:
            seen.add(out.dtype)

    fit, _, _ = tiny_fit([], dtype_hook)
    auto = precision_for("auto", "cpu")
    assert auto == "32-true"  # no GPU: autocast would only emulate bf16 on the CPU
    assert fit["engine"] == {"strategy": "SingleDeviceStrategy", "precision": auto,
                             "world_size": 1, "accelerator": "CPUAccelerator", "clip_grad": 0.0,
                             "steps_per_epoch": 6, "optimizer_steps": 3 * 5}  # fmt: skip
    assert seen == {torch.float32}
    seen.clear()
    fit, _, _ = tiny_fit(["train.precision=bf16-mixed"], dtype_hook)
    assert fit["engine"]["precision"] == "bf16-mixed"
    assert seen == {torch.bfloat16}  # the head ran under autocast
    # Clipping the gradient norm to far below Adam's eps shrinks every update ~100x.
    free, free_model, start = tiny_fit(["train.epochs=1"])
    clipped, clipped_model, _ = tiny_fit(["train.epochs=1", "train.clip_grad=1e-10"])
    assert clipped["engine"]["clip_grad"] == 1e-10

    def moved(m: FinetuneModel) -> float:
        return (m.head.fc.weight - start["head.fc.weight"]).abs().max().item()

    assert moved(clipped_model) < 0.05 * moved(free_model)
    # Several processes must exist before data is read (train.run launches them), not at fit.
    with pytest.raises(RuntimeError, match=r"2 processes, but they were not started"):
        tiny_fit(["train.devices=2"])


def cli(cfg: dict, folder: Path, *overrides: str) -> dict:
    """`medfm finetune` in a fresh process (Lightning re-runs it once per further rank)."""
    path = folder / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MASTER_PORT": str(rendezvous_port())}  # fmt: skip
    exe = Path(sys.executable).parent / "medfm"
    args = [str(exe), "finetune", "--config", str(path)]
    for o in overrides:
        args += ["--set", o]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((Path(cfg["out_dir"]) / "run.json").read_text())


@needs_pneumonia
@pytest.mark.slow
def test_two_process_ddp_finetune_over_gloo_matches_one_process(tmp_path):
    shards = write_pneumonia(tmp_path / "shards")
    encoder = write_encoder(tmp_path / "enc", {**ENC2D, "in_chans": 1},
                            Contract(kind="image2d", image_size=28, channels=1))  # fmt: skip
    runs = {}
    for name, devices in (("one", 1), ("two", 2)):
        cfg = {
            "name": name, "out_dir": str(tmp_path / name), "encoder": str(encoder),
            "mode": "full", "data": {"shards": str(shards), "batch_size": 17},
            "task": {"type": "binary", "label_key": "label",
                     "label_names": ["normal", "pneumonia"]},
            "train": {"epochs": 6, "lr": 2e-3, "device": "cpu", "devices": devices},
            "eval": {"bootstrap": 50, "plots": False},
        }  # fmt: skip
        runs[name] = cli(cfg, tmp_path)
    one, two = runs["one"]["fit"], runs["two"]["fit"]
    assert one["engine"]["strategy"] == "SingleDeviceStrategy" and one["engine"]["world_size"] == 1
    # Each rank trains on its half of the 240 train images: 120 = 7 x 17 + 1, and the batch of
    # one that ends each rank's epoch is left out on both ranks together (DDP cannot skip a step).
    assert two["engine"] == {"strategy": "DDPStrategy", "precision": "32-true", "world_size": 2,
                             "accelerator": "CPUAccelerator", "clip_grad": 0.0,
                             "steps_per_epoch": 8, "optimizer_steps": 6 * 7}  # fmt: skip
    assert one["engine"]["steps_per_epoch"] == math.ceil(240 / 17) == 15  # 14 x 17 + 2
    assert one["engine"]["optimizer_steps"] == 6 * 15
    auroc = {k: r["metrics"]["values"]["auroc"]["value"] for k, r in runs.items()}
    assert auroc["one"] > 0.75 and auroc["two"] > 0.75, auroc
    assert abs(auroc["one"] - auroc["two"]) < 0.1, auroc
    # rank 1 wrote nothing: one run folder, as one process writes it
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    print(f"test AUROC: 1 process {auroc['one']:.3f}, 2 DDP processes {auroc['two']:.3f}")
