"""Every registered fine-tuning task, through its whole interface: config checks, targets from
manifest-style labels, a head on a tiny real encoder whose loss falls over a few optimizer steps,
the validation score, test metrics with patient-level intervals, and the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from medfm.config import ConfigError
from medfm.finetune.card import model_card
from medfm.finetune.config import TaskConfig, load_config
from medfm.finetune.data import row_targets
from medfm.finetune.model import FinetuneModel
from medfm.finetune.tasks import TASKS, LabelError, SampleTask, task_for
from medfm.models import build_encoder
from medfm.models.contract import Contract

torch.set_num_threads(1)
TINY2D = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
          "img_size": 32, "patch_size": 8}  # fmt: skip
N = 16  # samples per batch, 8 patients of 2
# name -> (task section of a config, label of sample i): one example per registered task.
EXAMPLES = {
    "binary": ({"label_names": ["normal", "pneumonia"]}, lambda i: i % 2),
    "multiclass": ({"label_names": ["a", "b", "c"]}, lambda i: ["a", "b", "c"][i % 3]),
    "multilabel": ({"label_names": ["a", "b", "c"]}, lambda i: [["a"], ["b", "c"], ["c"]][i % 3]),
    "regression": ({"label_key": "age"}, lambda i: (i - 7.5) / 4),
    "segmentation": ({"label_names": ["background", "liver"], "label_values": [0, 5]}, None),
}


def config(name: str, **task) -> dict:
    section = {"type": name, **EXAMPLES[name][0], **task}
    return {"name": "t", "out_dir": "o", "encoder": "e", "data": {"shards": "s"},
            "task": section, "eval": {"bootstrap": 50}}  # fmt: skip


def label_map(i: int) -> torch.Tensor:
    """A disc of value 5 (the `liver` class) whose centre moves with i; 3 is not in the table."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = (yy - 10 - i) ** 2 + (xx - 16) ** 2 < 36
    return torch.where(disc, 5, torch.where(xx > 29, 3, 0)).to(torch.int16)


def items(name: str, key: str) -> list[dict]:
    """ShardDataset-style items: the manifest labels (or label maps) the task reads."""
    label = EXAMPLES[name][1]
    out = []
    for i in range(N):
        meta = {"dataset": "d", "patient_id": f"p{i // 2}", "synthetic": False, "labels": {}}
        item = {"key": f"k{i}", "meta": meta}
        if label is None:
            item["label_map"] = label_map(i)
        else:
            meta["labels"] = {key: label(i)}
        out.append(item)
    return out


def inputs(targets: torch.Tensor) -> torch.Tensor:
    """Images that carry their target (so that a head can learn it), plus noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 32, 32, generator=g) * 0.1
    if targets.ndim == 3:  # label maps: the foreground is brighter
        return x + targets[:, None].float()
    signal = targets.float().reshape(N, -1).mean(1)
    return x + (signal / signal.abs().max().clamp_min(1))[:, None, None, None]


@pytest.fixture(params=TASKS.names())
def name(request) -> str:
    if request.param not in EXAMPLES:
        pytest.fail(f"task {request.param!r} is registered without an example in this test")
    return request.param


def test_every_task_validates_its_config(name):
    cfg = load_config(None, base=config(name))
    assert task_for(cfg.task).name == name
    if task_for(cfg.task).needs_label_table:
        with pytest.raises(ConfigError, match="task.label_names: a .* task needs its labels"):
            load_config(None, base=config(name, label_names=[]))
    few_shot = ["train.few_shot_k=2"]
    if task_for(cfg.task).few_shot:
        load_config(None, base=config(name), overrides=few_shot)
    else:
        with pytest.raises(ConfigError, match="train.few_shot_k"):
            load_config(None, base=config(name), overrides=few_shot)


def test_task_specific_config_checks():
    with pytest.raises(ConfigError, match="binary tasks have 2 names"):
        load_config(None, base=config("binary", label_names=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="task.label_values: one label-map value"):
        load_config(None, base=config("segmentation", label_values=[0]))
    with pytest.raises(ConfigError, match="task.type"):
        task_for(TaskConfig(type="binarry", label_names=["a", "b"]))
    with pytest.raises(ConfigError, match="did you mean 'binary'"):
        load_config(None, base=config("binary", type="binarry"))


def test_a_new_task_is_one_registered_class():
    """A plug-in's task loads through the config like a built-in one: no list to edit."""

    class Ordinal(TASKS.get("binary")):
        pass

    TASKS.register("ordinal")(Ordinal)
    try:
        cfg = load_config(None, base=config("binary", type="ordinal"))
        assert cfg.task.type == "ordinal" and isinstance(task_for(cfg.task), Ordinal)
    finally:
        TASKS.unregister("ordinal")
    assert "ordinal" not in TASKS


def test_every_task_trains_its_head_on_a_real_encoder(name):
    cfg = load_config(None, base=config(name))
    task = task_for(cfg.task)
    torch.manual_seed(0)
    enc = build_encoder(TINY2D)
    model = FinetuneModel(enc, task.build_head(enc), task)
    contract = Contract(kind="image2d", image_size=32, intensity="unit")
    batch = items(name, cfg.task.label_key)
    y = task.collate_targets(batch, contract)
    assert len(y) == N
    x = inputs(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(8):
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(x)
    patients = [f"p{i // 2}" for i in range(N)]
    if isinstance(task, SampleTask):
        assert out.shape[0] == N
        v = task.val_score(out, y, patients)
        metrics = task.score(out, y, patients, cfg.eval, threshold=None)
    else:
        assert out.shape == (N, len(task.label_names), 32, 32)
        pred = out.argmax(1)
        pairs = list(zip(pred, y, strict=True))
        v = task.val_score([task.case_metrics(p, t, (1.0, 1.0), cfg.eval, False) for p, t in pairs])
        cases = [task.case_metrics(p, t, (1.0, 1.0), cfg.eval, True) for p, t in pairs]
        metrics = task.metrics(cases, patients, cfg.eval)
    assert np.isfinite(v)
    assert metrics
    for m in metrics.values():
        assert m["n_boot"] > 0 and m["ci_low"] <= m["ci_high"], m
    card = model_card(card_meta(name, metrics), task)
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == task.pipeline_tag and name in front["tags"]
    assert f"A {name} model fine-tuned" in card and "95% CI" in card


def card_meta(name: str, metrics: dict) -> dict:
    """What an export's medfm.json holds, as far as the card reads it."""
    return {
        "name": "t", "mode": "lora", "task": {"type": name}, "label_names": [],
        "base_encoder": {"uri": "enc", "sha256": "0" * 64},
        "preprocessing": {"kind": "image2d", "intensity": "unit", "image_size": 32},
        "data": {"shards": {"manifest_sha256": "1" * 64, "num_samples": N, "datasets": {}}},
        "metrics": {"ci": 0.95, "bootstrap": 50, "values": metrics},
    }  # fmt: skip


def test_sample_targets_from_manifest_rows_and_label_table_checks(name):
    cfg = load_config(None, base=config(name))
    task = task_for(cfg.task)
    if not isinstance(task, SampleTask):
        pytest.skip("targets from label maps: covered by the training test")
    rows = [
        {"key": it["key"], "labels": json.dumps(it["meta"]["labels"])}
        for it in items(name, cfg.task.label_key)
    ]
    targets = row_targets(rows, task, "root")
    assert len(targets) == N
    task.check_train_targets(targets, "root")
    if task.few_shot:
        keys = task.few_shot_keys(rows, targets, 2, seed=0)
        assert len(keys) <= 2 * len(task.label_names) and keys == task.few_shot_keys(
            rows, targets, 2, seed=0
        )
        with pytest.raises(LabelError, match="has only"):
            task.few_shot_keys(rows, targets, N, seed=0)
    if task.class_counts(targets) is not None:
        one_class = [r for r in rows if (task.class_counts(row_targets([r], task, "r")) > 0)[0]]
        with pytest.raises(LabelError, match="no samples in the train split"):
            task.check_train_targets(row_targets(one_class, task, "root"), "root")
        with pytest.raises(LabelError, match="root:bad: label 'zzz' is not in the labels"):
            row_targets([{"key": "bad", "labels": json.dumps({"label": "zzz"})}], task, "root")


def test_binary_takes_a_val_chosen_threshold_and_others_none():
    binary = task_for(load_config(None, base=config("binary")).task)
    outputs, targets = torch.tensor([-1.0, 0.2, 0.4, 2.0]), torch.tensor([0, 0, 1, 1])
    assert binary.decision_threshold(0.3, None) == 0.3
    chosen = binary.decision_threshold("val_youden", lambda: (outputs, targets))
    assert torch.sigmoid(torch.tensor(0.2)) < chosen <= torch.sigmoid(torch.tensor(0.4))
    regression = task_for(load_config(None, base=config("regression")).task)
    assert regression.decision_threshold("val_youden", None) is None
    assert regression.roc_curves(outputs, targets) is None
