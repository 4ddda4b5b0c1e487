"""`medfm finetune export RUN --out DIR` and `medfm.finetune.load(DIR)`.

An export is small and self-describing: a PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`) or the fully fine-tuned
encoder, the head as safetensors, `medfm.json` (base encoder id and hash, preprocessing contract,
labels, metrics with CIs, data manifest hashes, file hashes) and a Hugging Face model card. It is
written to a temporary folder and renamed into place, so a half-written export never exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from medfm.config import from_dict
from medfm.io import commit, get_fs, sha256_file, write_json, write_text
from medfm.models import build_encoder

from .card import model_card
from .config import TaskConfig
from .data import contract_from_dict
from .encoder import BaseEncoder, load_base_encoder
from .model import FinetuneModel
from .tasks import Task, task_for
from .train import RUN_RECORD

EXPORT_FORMAT = "medfm-finetune-export"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(ValueError):
    """An export or run folder that cannot be used; the message says why."""


class BaseEncoderMismatchError(ExportError):
    """An adapter applied to a different base encoder than the one it was trained on."""


def recorded_task(record: dict[str, Any], where: str) -> Task:
    """The Task of a run's or export's task record (older records lack `pool`: its default)."""
    return task_for(from_dict(TaskConfig, record, where))


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the export folder of a finished run; returns its path."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_RECORD).is_file():
        raise ExportError(f"{run_dir}: no {RUN_RECORD}; not a finished `medfm finetune` run")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    run = json.loads((run_dir / RUN_RECORD).read_text())
    tmp = out.with_name(f"{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ckpt = run_dir / "checkpoint"
    shutil.copy2(ckpt / "head.safetensors", tmp / "head.safetensors")
    if run["mode"] == "lora":
        for name in ADAPTER_FILES:
            shutil.copy2(ckpt / "adapter" / name, tmp / name)
    elif run["mode"] == "full":
        shutil.copy2(ckpt / "encoder.safetensors", tmp / "encoder.safetensors")
    for extra in ("roc.png", "seg_overlays.png", "metrics.json"):
        if (run_dir / extra).is_file():
            shutil.copy2(run_dir / extra, tmp / extra)
    files = {p.name: sha256_file(p)[0] for p in sorted(tmp.iterdir())}
    meta = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "name": run["name"],
        "mode": run["mode"],
        "task": run["task"],
        "label_names": run["task"]["label_names"],
        "base_encoder": run["base_encoder"],
        "preprocessing": run["preprocessing"],
        "metrics": run["metrics"],
        # The binary decision threshold the run's accuracy-type metrics used (chosen on val
        # when eval.threshold asked for it), so that users of the export decide the same way.
        "threshold": run["fit"].get("threshold"),
        "data": run["data"],
        "files": files,
    }
    write_json(tmp / "medfm.json", meta, indent=1)
    write_text(tmp / "README.md", model_card(meta, recorded_task(run["task"], "run.json: task")))
    commit(get_fs(str(out))[0], str(tmp), str(out))  # replaces an earlier export as a whole
    return out


def read_export(folder: Path) -> dict[str, Any]:
    path = folder / "medfm.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no medfm.json; not a medfm fine-tuning export")
    meta = json.loads(path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a {EXPORT_FORMAT} record")
    for name, digest in meta["files"].items():
        got = sha256_file(folder / name)[0] if (folder / name).is_file() else "missing"
        if got != digest:
            raise ExportError(f"{folder / name}: sha256 {got} does not match medfm.json ({digest})")
    return meta


def load(
    folder: str | Path, base: str | BaseEncoder | None = None, device: str = "cpu"
) -> FinetuneModel:
    """The exported model (eval mode) on its base encoder, ready for preprocessed inputs.

    `base` defaults to the encoder recorded in medfm.json (a path or hub:// reference). Adapters
    and probe heads refuse a base encoder whose weights hash differs from the recorded one.
    """
    from medfm.finetune import hub

    folder = hub.resolve(folder)
    meta = read_export(folder)
    recorded = meta["base_encoder"]
    mode = meta["mode"]
    if mode == "full":
        arch = recorded["architecture"]
        encoder = build_encoder({"name": arch["name"], **arch["params"]}, where="medfm.json")
        encoder.load_state_dict(load_file(folder / "encoder.safetensors"))
    else:
        base = base if isinstance(base, BaseEncoder) else load_base_encoder(base or recorded["uri"])
        if base.sha256 != recorded["sha256"]:
            raise BaseEncoderMismatchError(
                f"{folder}: this {mode} export was trained on base encoder sha256 "
                f"{recorded['sha256']} ({recorded['uri']}), but the given encoder {base.uri} has "
                f"sha256 {base.sha256}; load it on the encoder it was trained on"
            )
        encoder = base.encoder
        if mode == "lora":
            from peft import PeftModel

            encoder = PeftModel.from_pretrained(encoder, str(folder))
    task = recorded_task(meta["task"], "medfm.json: task")
    head = task.build_head(encoder if mode != "lora" else encoder.get_base_model())
    head.load_state_dict(load_file(folder / "head.safetensors"))
    model = FinetuneModel(encoder, head, task).to(device).eval()
    model.medfm = meta
    model.contract = contract_from_dict(meta["preprocessing"])  # how to prepare inputs
    return model
