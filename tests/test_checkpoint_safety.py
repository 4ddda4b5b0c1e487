"""Issue 18, checkpoint items: every checkpoint is read once, through `weights_only=True` (FSDP
included), and `--resume` takes the newest complete checkpoint of any name.

Real Lightning checkpoints of a tiny MAE on PneumoniaMNIST; the hostile checkpoint carries a
`__reduce__` payload that would write a marker file, so "nothing ran" is checked, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pretrain_helpers import DECODER, base_config, pneumonia_shards, write_yaml

from medfm.pretrain.checkpoint import (
    LAST,
    ResumeError,
    SafeCheckpointIO,
    checkpoint_dir,
    resume_checkpoint,
)
from medfm.pretrain.config import load_config
from medfm.pretrain.train import build, build_strategy, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = {"size": "tiny", "embed_dim": 32, "depth": 1, "num_heads": 2}


class WritesMarker:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_data):
    return pneumonia_shards(sample_data, tmp_path_factory.mktemp("pm") / "pm", n=64)


def tiny_config(tmp: Path, shards: Path, name: str, *overrides: str, **train):
    model = {"name": "vit2d", "img_size": 28, "patch_size": 7, **TINY}
    tree = base_config(tmp, shards, model, [{"name": "mae", **DECODER}], **train)
    tree["out_dir"] = str(tmp / name)
    return load_config(write_yaml(tree, tmp / f"{name}.yaml"), list(overrides))


def evil_copy(good: Path, dest: Path, marker: Path, global_step: int) -> Path:
    """A real checkpoint with a pickled object added: loading it unsafely writes `marker`."""
    state = torch.load(good, weights_only=True)
    state["global_step"] = global_step
    state["callbacks"]["evil"] = WritesMarker(marker)
    torch.save(state, dest)
    return dest


# -- item 14: resume from the newest complete checkpoint of any name --------------------------
def test_resume_after_a_kill_during_the_first_last_ckpt_write(tmp_path, shards):
    cfg = tiny_config(tmp_path, shards, "run", max_steps=4, checkpoint_every=2)
    run(cfg)
    ckpts = checkpoint_dir(cfg)
    (ckpts / LAST).unlink()  # the kill came during the first last.ckpt write:
    tmp = ckpts / f"{LAST}.tmp-0123456789ab"  # what atomic_open had written so far
    tmp.write_bytes((ckpts / "step0000004.ckpt").read_bytes()[:1000])
    summary = run(cfg, resume=True)
    assert summary["steps"] == 4
    assert not tmp.exists()  # the temporary is cleaned up
    assert torch.load(ckpts / LAST, weights_only=True)["global_step"] == 4


def test_resume_takes_the_newest_checkpoint_whatever_its_name(tmp_path, shards):
    cfg = tiny_config(tmp_path, shards, "run", max_steps=4, checkpoint_every=2)
    run(cfg)
    ckpts = checkpoint_dir(cfg)
    older = torch.load(ckpts / LAST, weights_only=True)
    older["global_step"] = 2
    torch.save(older, ckpts / LAST)  # last.ckpt is now behind step0000004.ckpt
    path, state = resume_checkpoint(cfg, force=False)
    assert path.name == "step0000004.ckpt" and state["global_step"] == 4
    for p in ckpts.glob("*.ckpt"):
        p.unlink()
    with pytest.raises(ResumeError, match="no checkpoint in"):
        resume_checkpoint(cfg, force=False)


# -- item 12: one safe read of every checkpoint, FSDP included --------------------------------
def test_resume_refuses_a_pickled_payload_and_runs_nothing(tmp_path, shards):
    cfg = tiny_config(tmp_path, shards, "run", max_steps=2, checkpoint_every=2)
    run(cfg)
    ckpts = checkpoint_dir(cfg)
    marker = tmp_path / "marker.txt"
    evil_copy(ckpts / LAST, ckpts / "step0000099.ckpt", marker, 99)
    with pytest.raises(ResumeError, match="step0000099.ckpt.*not a loadable medfm checkpoint"):
        run(cfg, resume=True)
    assert not marker.exists()
    # and under fsdp, whose Lightning restore would otherwise unpickle it
    fsdp = tiny_config(tmp_path, shards, "run", "train.strategy=fsdp", max_steps=2)
    with pytest.raises(ResumeError):
        run(fsdp, resume=True, force_resume=True)
    assert not marker.exists()


def test_fsdp_strategy_never_unpickles_a_checkpoint(tmp_path, shards):
    cfg = tiny_config(tmp_path, shards, "run", "train.strategy=fsdp", max_steps=2)
    module, _ = build(cfg)
    marker = tmp_path / "marker.txt"
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in module.state_dict().items()}
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": trained, "callbacks": {}, "global_step": 0}, good)
    evil = evil_copy(good, tmp_path / "evil.ckpt", marker, 1)

    def strategy_with(io: SafeCheckpointIO):
        strategy = build_strategy(cfg, module, io)
        strategy._lightning_module = module  # what Trainer.fit attaches before a restore
        strategy.model = module
        return strategy

    with pytest.raises(ResumeError, match="evil.ckpt"):
        strategy_with(SafeCheckpointIO()).load_checkpoint(evil)
    assert not marker.exists()
    # Lightning's own FSDP restore runs on the state read safely (here: already read, and the
    # file swapped for the hostile one since): the weights arrive, nothing is unpickled.
    state = torch.load(good, weights_only=True)
    evil_copy(good, good, marker, 1)
    strategy_with(SafeCheckpointIO(preloaded={str(good): state})).load_checkpoint(good)
    assert not marker.exists()
    for k, v in module.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_the_resumed_state_is_read_once(tmp_path, shards, monkeypatch):
    """Lightning gets the state `resume_checkpoint` read and checked, not a second read of a
    file that may have been swapped in between."""
    cfg = tiny_config(tmp_path, shards, "run", max_steps=2, checkpoint_every=2)
    run(cfg)
    reads = []
    real_load = torch.load

    def counted_load(f, *args, **kwargs):
        reads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "load", counted_load)
        run(cfg, resume=True)
    assert sorted(reads) == ["last.ckpt", "step0000002.ckpt"]  # each once, Lightning's included
    path, state = resume_checkpoint(cfg, force=False)
    marker = tmp_path / "marker.txt"
    evil_copy(path, path, marker, 2)  # swapped after the check
    io = SafeCheckpointIO(preloaded={str(path): state})
    assert io.load_checkpoint(path) is state
    assert not marker.exists()
    with pytest.raises(ResumeError):  # asked again, it reads the file, safely
        io.load_checkpoint(path)
    assert not marker.exists()
