"""The fine-tuning task interface and its registry.

A `Task` owns what differs between tasks: its head and how the model maps inputs to outputs,
the loss, the targets (from a sample's labels or its label map) and their checks against the
labels table, the validation score that picks the best epoch, the test metrics with their
intervals, and the model card's task fields. The rest of finetune (data, training loops,
export) calls these methods and never looks at the task's name.

    @TASKS.register("binary")
    class Binary(Classification): ...

    task = task_for(cfg.task)          # the Task of a TaskConfig (`task.type` names it)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medfm.config import ConfigError
from medfm.registry import Registry

from ..metrics import MetricFns, bootstrap, plot_roc

if TYPE_CHECKING:
    from medfm.models import Encoder
    from medfm.models.contract import Contract

    from ..config import EvalConfig, FinetuneConfig, TaskConfig
    from ..model import FinetuneModel

TASKS = Registry("fine-tuning task", group="medfm.tasks")
# (class name, its probabilities, its 0/1 targets): one ROC curve
Curve = tuple[str, torch.Tensor, torch.Tensor]


class LabelError(ValueError):
    """Labels that do not fit the task's labels table."""


def task_for(cfg: TaskConfig) -> Task:
    """The registered Task named by `cfg.type`, bound to that config."""
    return TASKS.get(cfg.type, "task.type")(cfg)


class Task(ABC):
    """One kind of fine-tuning task, bound to its `TaskConfig`."""

    pipeline_tag = "image-classification"  # the model card's Hugging Face pipeline
    needs_label_table = True  # task.label_names must be given
    few_shot = False  # train.few_shot_k can draw k samples per class

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.type

    @property
    def label_names(self) -> list[str]:
        return self.cfg.label_names

    def validate(self, cfg: FinetuneConfig) -> None:
        """The task's config checks, before any data is read (ConfigError names the key)."""
        self.validate_labels()
        if cfg.train.few_shot_k and not self.few_shot:
            raise ConfigError("train.few_shot_k: few-shot sampling needs a classification task")

    def validate_labels(self) -> None:
        if self.needs_label_table and not self.label_names:
            raise ConfigError(f"task.label_names: a {self.name} task needs its labels table")

    @abstractmethod
    def build_head(self, encoder: Encoder) -> nn.Module:
        """The head over `encoder`'s features, untrained."""

    @abstractmethod
    def forward(self, model: FinetuneModel, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs -> the head's outputs (logits or values)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def collate_targets(self, items: list[dict[str, Any]], contract: Contract) -> torch.Tensor:
        """The batch's targets, from ShardDataset items."""

    @abstractmethod
    def run(
        self,
        model: FinetuneModel,
        root: str,
        contract: Contract,
        cfg: FinetuneConfig,
        device: torch.device,
        out: Path,
    ) -> tuple[dict, dict, dict]:
        """Train, keep the best val epoch, score test once: (metrics, fit record, sources)."""


class SampleTask(Task):
    """One target per sample from `labels[label_key]`, a linear head on the pooled embedding,
    metrics over all samples with a patient-level bootstrap."""

    @property
    @abstractmethod
    def num_outputs(self) -> int: ...

    @abstractmethod
    def encode(self, value: Any, where: str) -> np.ndarray:
        """One sample's label value -> its numeric target."""

    @abstractmethod
    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> what the metrics score (probabilities, or values)."""

    @abstractmethod
    def metric_fns(self, threshold: float = 0.5) -> MetricFns:
        """Test metrics; `threshold`: the decision threshold, for tasks that take one."""

    def build_head(self, encoder: Encoder) -> nn.Module:
        from ..heads import LinearHead

        return LinearHead(encoder.embed_dim, self.num_outputs)

    def forward(self, model: FinetuneModel, x: torch.Tensor) -> torch.Tensor:
        return model.head(model.features(x))

    def class_index(self, value: Any, where: str) -> int:
        """A label given by name or index -> its index in the labels table."""
        names = self.label_names
        if isinstance(value, str):
            if value not in names:
                raise LabelError(f"{where}: label {value!r} is not in the labels table {names}")
            return names.index(value)
        i = int(value)
        if not 0 <= i < len(names):
            raise LabelError(f"{where}: label index {i} is outside the labels table {names}")
        return i

    def target(self, labels: dict[str, Any], where: str) -> np.ndarray:
        """The numeric target of one sample's labels."""
        key = self.cfg.label_key
        if key not in labels:
            raise LabelError(f"{where}: no label {key!r} (labels: {sorted(labels)})")
        return self.encode(labels[key], where)

    def collate_targets(self, items: list[dict[str, Any]], contract: Contract) -> torch.Tensor:
        return torch.as_tensor(
            np.stack([self.target(it["meta"]["labels"], it["key"]) for it in items])
        )

    def class_counts(self, targets: np.ndarray) -> np.ndarray | None:
        """Samples per class of the labels table; None for tasks without classes."""
        return None

    def class_members(self, targets: np.ndarray, c: int) -> np.ndarray:
        """Indices of the samples of class `c` (few-shot draws)."""
        raise NotImplementedError(f"a {self.name} task has no classes to draw from")

    def check_train_targets(self, targets: np.ndarray, where: str) -> None:
        """Every class of the table must occur in train (else it can never be learned or
        scored)."""
        counts = self.class_counts(targets)
        if counts is None:
            return
        absent = [n for n, c in zip(self.label_names, counts, strict=True) if c == 0]
        if absent:
            raise LabelError(
                f"{where}: classes {absent} of task.label_names have no samples in the train "
                "split; drop them from the labels table or add labeled training data"
            )

    def few_shot_keys(
        self, rows: list[dict[str, Any]], targets: np.ndarray, k: int, seed: int
    ) -> set[str]:
        """Keys of k samples per class, drawn reproducibly by `seed`."""
        rng = np.random.default_rng(seed)
        chosen: set[str] = set()
        for c, name in enumerate(self.label_names):
            pool = self.class_members(targets, c)
            if len(pool) < k:
                raise LabelError(
                    f"few-shot k={k}: class {name!r} has only {len(pool)} train samples"
                )
            chosen.update(rows[i]["key"] for i in rng.choice(pool, size=k, replace=False))
        return chosen

    def evaluate(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        patients: list[str],
        n_boot: int,
        ci: float,
        threshold: float = 0.5,
    ) -> dict[str, dict[str, float]]:
        """Metrics with patient-level bootstrap CIs from raw model outputs."""
        fns = self.metric_fns(threshold)
        return bootstrap(fns, self.probabilities(outputs), targets, patients, n_boot, ci)

    def selection_score(self, metrics: dict[str, dict[str, float]]) -> float:
        """Which val metric picks the best epoch (higher is better): AUROC by default."""
        return metrics["auroc"]["value"]

    def val_score(self, outputs: torch.Tensor, targets: torch.Tensor, patients: list[str]) -> float:
        """The epoch's val score (no bootstrap on val); -inf where it is undefined."""
        v = self.selection_score(self.evaluate(outputs, targets, patients, n_boot=1, ci=0.95))
        return v if math.isfinite(v) else -math.inf

    def decision_threshold(self, setting: float | str, val: Any) -> float | None:
        """The decision threshold the metrics use (None: the task takes none); `val` returns
        (outputs, targets) on val for thresholds chosen there."""
        return None

    def roc_curves(self, preds: torch.Tensor, targets: torch.Tensor) -> list[Curve] | None:
        """The ROC curves to plot; None: the task has no ROC."""
        return None

    def score(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        patients: list[str],
        eval_cfg: EvalConfig,
        threshold: float | None,
        roc_png: str | Path | None = None,
    ) -> dict[str, dict[str, float]]:
        """Metrics with CIs of a scored split, and its ROC curve when `roc_png` is given and
        the task has one."""
        threshold = 0.5 if threshold is None else threshold
        m = self.evaluate(outputs, targets, patients, eval_cfg.bootstrap, eval_cfg.ci, threshold)
        curves = None if roc_png is None else self.roc_curves(self.probabilities(outputs), targets)
        if curves is not None:
            plot_roc(curves, Path(roc_png), m)
        return m

    def run(
        self,
        model: FinetuneModel,
        root: str,
        contract: Contract,
        cfg: FinetuneConfig,
        device: torch.device,
        out: Path,
    ) -> tuple[dict, dict, dict]:
        from ..samples import run_samples

        return run_samples(self, model, root, contract, cfg, device, out)
