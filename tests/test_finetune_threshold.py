"""Fine-tuning options used by bench/learning.py: a decision threshold chosen on val, and 2D
training augmentation (shift + zoom). Unit-level, no training."""

from __future__ import annotations

import pytest
import torch

from medfm.config import ConfigError
from medfm.finetune.config import TaskConfig, load_config
from medfm.finetune.metrics import choose_threshold
from medfm.finetune.samples import augment_2d
from medfm.finetune.tasks import task_for

BASE = {
    "name": "t",
    "out_dir": "/tmp/unused",
    "encoder": "unused",
    "data": {"shards": "unused"},
    "task": {"type": "binary", "label_names": ["a", "b"]},
}


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_youden_threshold_separates_classes_and_accuracy_follows_it():
    # Negatives score 0.6-0.7, positives 0.8-0.9: at 0.5 every negative is a false positive.
    probs = [0.6, 0.65, 0.7, 0.8, 0.85, 0.9]
    outputs = torch.tensor([logit(p) for p in probs])
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    t = choose_threshold(outputs, targets, "val_youden")
    assert 0.7 < t <= 0.8
    assert choose_threshold(outputs, targets, "val_accuracy") == pytest.approx(t)
    patients = [str(i) for i in range(6)]
    binary = task_for(TaskConfig(type="binary", label_names=["a", "b"]))
    at_half = binary.evaluate(outputs, targets, patients, 10, 0.95)
    at_t = binary.evaluate(outputs, targets, patients, 10, 0.95, threshold=t)
    assert at_half["accuracy"]["value"] == pytest.approx(0.5)
    assert at_t["accuracy"]["value"] == pytest.approx(1.0)
    assert at_t["auroc"]["value"] == at_half["auroc"]["value"]  # ranking metric: unchanged


def test_youden_differs_from_accuracy_under_imbalance():
    # 1 negative at 0.55 among 9 positives spread out: accuracy keeps everything positive,
    # Youden gives up a positive to get the negative right.
    probs = [0.55, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]
    outputs = torch.tensor([logit(p) for p in probs])
    targets = torch.tensor([0] + [1] * 9)
    assert choose_threshold(outputs, targets, "val_accuracy") <= 0.5
    assert 0.55 < choose_threshold(outputs, targets, "val_youden") <= 0.6


def test_threshold_config_values():
    for value in (0.5, 0.3, "val_youden", "val_accuracy"):
        cfg = load_config(None, base={**BASE, "eval": {"threshold": value}})
        assert cfg.eval.threshold == value
    with pytest.raises(ConfigError, match="eval.threshold"):
        load_config(None, base={**BASE, "eval": {"threshold": "val_best"}})


def test_augment_2d_keeps_shape_and_is_identity_when_off():
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(augment_2d(x, 0, 0.0), x, atol=1e-5)
    torch.manual_seed(0)
    y = augment_2d(x, 2, 0.1)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6  # border padding, bilinear
    shifted = augment_2d(torch.arange(28.0).expand(1, 1, 28, 28).clone(), 0, 0.0)
    assert torch.allclose(shifted, torch.arange(28.0).expand(1, 1, 28, 28), atol=1e-4)
