"""`medfm finetune`: adapt a pretrained encoder to a labeled task and evaluate it honestly.

Model selection uses val only; the test split is scored once, at the end, with the weights of the
best val epoch. Everything the export needs lands in the run folder: `run.json` (what was trained
on what), `checkpoint/` (head, adapter or full encoder; safetensors only), `metrics.json` and a
ROC PNG (or segmentation overlays). The task (`task.type`, finetune/tasks/) builds the head and
runs its own training loop: finetune/samples.py or finetune/segment.py, over finetune/fit.py.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medfm.device import select_device
from medfm.finetune import hub
from medfm.io import is_remote, put_tree, save_safetensors, write_json
from medfm.models.contract import Contract

from .config import RUN_RECORD
from .data import contract_for, split_rows
from .encoder import BaseEncoder, load_base_encoder
from .fit import is_global_zero, launch
from .model import FinetuneModel, apply_lora
from .tasks import Task, task_for

if TYPE_CHECKING:
    from .config import FinetuneConfig


def build_model(base: BaseEncoder, cfg: FinetuneConfig, task: Task) -> FinetuneModel:
    encoder = base.encoder
    head = task.build_head(encoder)
    if cfg.mode == "lora":
        encoder = apply_lora(encoder, cfg.lora, base.uri)
    elif cfg.mode == "linear_probe":
        encoder.requires_grad_(False)
    return FinetuneModel(encoder, head, task)


def data_root(shards: str) -> str:
    """The shard set to read: a hub reference pulled to a local folder, a URL as it is."""
    return shards if not hub.is_hub_uri(shards) and is_remote(shards) else str(hub.resolve(shards))


def data_source(root: str, cfg: FinetuneConfig) -> dict[str, Any]:
    """Modality, spacing and channels of the fine-tuning data (part of the contract record)."""
    row = split_rows(root, "train", cfg)[0]
    return {
        "modality": row["modality"],
        "spacing": list(row["spacing"] or []),
        "channels": list(row["channels"] or []),
    }


def run(cfg: FinetuneConfig) -> Path | str:
    """Fine-tune, evaluate and write the run folder; returns its path (a URL for a URL).

    PEFT, matplotlib and the tasks write plain local files, so a run whose out_dir is on an
    object store is written to a local staging folder, then uploaded file by file (each under
    a temporary key, then committed), run.json last: it is what marks a finished run.

    Several processes (train.devices, train.num_nodes) start here, before any data is read;
    every rank trains and scores, rank 0 alone writes the run folder (finetune/fit.py)."""
    launch(cfg.train)
    if not is_global_zero():
        with tempfile.TemporaryDirectory(prefix="medfm-finetune-rank-") as scratch:
            train_into(cfg, Path(scratch))
        return cfg.out_dir
    if not is_remote(cfg.out_dir):
        return train_into(cfg, Path(cfg.out_dir))
    with tempfile.TemporaryDirectory(prefix="medfm-finetune-") as stage:
        train_into(cfg, Path(stage))
        put_tree(stage, cfg.out_dir, last=(RUN_RECORD,))
    return cfg.out_dir


def train_into(cfg: FinetuneConfig, out: Path) -> Path:
    torch.manual_seed(cfg.train.seed)
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.device)
    base = load_base_encoder(cfg.encoder)
    contract = contract_for(base.preprocessing, base.encoder, cfg)
    task = task_for(cfg.task)
    model = build_model(base, cfg, task).to(device)
    root = data_root(cfg.data.shards)
    metrics, fit, sources = task.run(model, root, contract, cfg, device, out)
    save_run(out, model, base, contract, cfg, metrics, fit, sources)
    return out


def save_run(
    out: Path,
    model: FinetuneModel,
    base: BaseEncoder,
    contract: Contract,
    cfg: FinetuneConfig,
    metrics: dict,
    fit: dict,
    sources: dict,
) -> None:
    ckpt = out / "checkpoint"
    save_safetensors(
        ckpt / "head.safetensors", {k: v.contiguous() for k, v in model.head.state_dict().items()}
    )
    if cfg.mode == "lora":
        with warnings.catch_warnings():  # PEFT looks for an HF config.json beside the base
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.encoder.save_pretrained(ckpt / "adapter")
    elif cfg.mode == "full":
        enc = model.base_encoder()
        save_safetensors(
            ckpt / "encoder.safetensors", {k: v.contiguous() for k, v in enc.state_dict().items()}
        )
    record = {
        "name": cfg.name,
        "mode": cfg.mode,
        "task": {
            "type": cfg.task.type,
            "label_key": cfg.task.label_key,
            "label_names": cfg.task.label_names,
            "label_values": cfg.task.label_values,
            "pool": cfg.task.pool,
        },
        "base_encoder": {
            "uri": base.uri,
            "sha256": base.sha256,
            "architecture": base.architecture,
            "pretraining_data": base.manifests,
        },
        "preprocessing": contract.describe()
        | {
            "pretraining_source": base.preprocessing.get("source", {}),
            "finetuning_source": data_source(sources["shards"]["uri"], cfg),
        },
        "data": sources,
        "metrics": {
            "split": "test",
            "ci": cfg.eval.ci,
            "bootstrap": cfg.eval.bootstrap,
            "resampling_unit": "patient",
            "values": metrics,
        },
        "fit": fit,
        "config": cfg.to_dict(),
    }
    write_json(out / RUN_RECORD, record, indent=1)
    summary = {
        "task": cfg.task.type,
        "mode": cfg.mode,
        "split": "test",
        "ci": cfg.eval.ci,
        "resampling_unit": "patient",
        "threshold": fit.get("threshold"),
        "metrics": metrics,
    }
    write_json(out / "metrics.json", summary, indent=1)
