"""Fine-tuning: adapters and heads for downstream tasks, evaluation, export.

    run(load_config("task.yaml"))      train, pick the best val epoch, score test once
    export(run_dir, out_dir)           PEFT adapter + head + medfm.json + model card
    load(out_dir)                      the exported model on its (hash-checked) base encoder

Heavy imports happen on first use, so `import medfm.finetune` (and the hub) stays light.
"""

from __future__ import annotations

from typing import Any


def load(folder: Any, base: Any = None, device: str = "cpu") -> Any:
    """Load an export (folder or hub:// reference); see `medfm.finetune.export.load`."""
    from .export import load as _load

    return _load(folder, base, device)


def export(run_dir: Any, out: Any, overwrite: bool = False) -> Any:
    from .export import export as _export

    return _export(run_dir, out, overwrite)


def run(cfg: Any) -> Any:
    from .train import run as _run

    return _run(cfg)


def load_config(path: Any, overrides: Any = (), base: Any = None) -> Any:
    from .config import load_config as _load_config

    return _load_config(path, overrides, base)
