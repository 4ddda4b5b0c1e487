"""One "node" of the two-node Lightning test: runs `medfm pretrain ARGS` in this process, then
saves this rank's final weights to OUT (safetensors) so the test can compare the ranks.

Usage: python clusters_rank_worker.py OUT.safetensors --config CFG.yaml [key=value ...]
The Trainer is only observed (its `fit` is wrapped to keep a reference), never replaced.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

seen: dict[str, pl.Trainer] = {}
_fit = pl.Trainer.fit


def _observed_fit(self: pl.Trainer, *args, **kwargs):
    seen["trainer"] = self
    return _fit(self, *args, **kwargs)


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    pl.Trainer.fit = _observed_fit
    from medfm.cli import app

    app(args=["pretrain", *args], prog_name="medfm", standalone_mode=False)
    trainer = seen["trainer"]
    weights = {
        k: v.detach().cpu().contiguous() for k, v in trainer.lightning_module.state_dict().items()
    }
    meta = {
        "rank": str(trainer.global_rank),
        "world": str(trainer.world_size),
        "step": str(trainer.global_step),
    }
    save_file(weights, out, metadata=meta)


if __name__ == "__main__":
    main()
