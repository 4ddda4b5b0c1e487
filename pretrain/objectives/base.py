"""The objective interface: a small nn.Module with `loss(batch) -> dict` (must hold "loss").

Objectives do not own the encoders (several objectives share one in a hybrid); they reach them
through a `Context` that the engine also uses to hand out the per-step random seed (so masks and
views are the same after a resume) and the cross-rank gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medfm.models.base import Encoder
from medfm.registry import Registry

OBJECTIVES = Registry("objective", group="medfm.objectives")
# diffusers and MONAI's generative networks take seconds to import: these objectives load on
# their first lookup only.
OBJECTIVES.register_lazy("diffusion", "medfm.pretrain.objectives.diffusion")
OBJECTIVES.register_lazy("autoencoder_kl", "medfm.pretrain.objectives.autoencoder")
OBJECTIVES.register_lazy("latent_diffusion", "medfm.pretrain.objectives.latent_diffusion")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank, keeping the autograd graph (negatives from all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class Context:
    """What objectives share: the encoders and the per-step seed set by the engine."""

    encoder: Encoder | None
    pair_encoder: Encoder | None = None
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


class Objective(nn.Module):
    """Base class. `kinds` lists the data kinds the objective can train on."""

    kinds: tuple[str, ...] = ()
    needs_pair: bool = False  # cross-modal: batch["pair"] holds the second modality

    def __init__(self, name: str, config: Any, ctx: Context):
        super().__init__()
        self.name, self.config = name, config
        self._ctx = ctx  # a plain object: not registered as a submodule

    @property
    def encoder(self) -> Encoder:
        return self._ctx.encoder

    def check(self, kind: str | None) -> None:
        """Refuse data the objective cannot train on (before the first step)."""
        if kind is not None and self.kinds and kind not in self.kinds:
            raise ValueError(
                f"objective {self.name!r} trains on {'/'.join(self.kinds)} data, "
                f"but the shards hold {kind} samples"
            )

    def check_classes(self, classes: list[Any]) -> None:
        """Refuse class labels (data.class_key) that a class-conditional objective cannot use."""

    def contract_hints(self) -> dict[str, Any]:
        """Input-contract fields (channels, patch_size) for runs without an encoder."""
        return {}

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        """Training FLOPs (fwd + bwd) per sample, for MFU; 0 when unknown."""
        return 0.0

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Tensors for a PNG grid at checkpoints (inputs, masked, reconstructions), if any."""
        return None

    def export_modules(self) -> dict[str, nn.Module]:
        """Extra modules to export besides the encoder (a diffusion objective's UNet)."""
        return {}
