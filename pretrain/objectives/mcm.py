"""Masked-code modeling for EHR sequences: the BERT objective over diagnosis/lab/drug codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.models.ehr import PAD_ID

from .base import OBJECTIVES, Context, Objective


@dataclass
class MCMConfig:
    mask_ratio: float = 0.15


class MaskedCodeModeling(Objective):
    kinds = ("ehr",)

    def __init__(self, cfg: MCMConfig, ctx: Context):
        super().__init__("mcm", cfg, ctx)
        enc = ctx.encoder
        self.head = nn.Linear(enc.embed_dim, enc.config.vocab_size)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokens = batch["data"]
        real = tokens != PAD_ID
        gen = self._ctx.generator(tokens.device)
        chosen = (
            torch.rand(tokens.shape, generator=gen, device=tokens.device) < self.config.mask_ratio
        ) & real
        # Every sequence masks at least its first real token, so no sample contributes nothing.
        first = real.float().argmax(dim=1)
        chosen[torch.arange(len(tokens)), first] |= real.any(dim=1)
        inputs = tokens.masked_fill(chosen, self.encoder.mask_id)
        hidden = self.encoder.encode(self.encoder.tokenize(inputs, batch), ~real)[:, 1:]
        logits = self.head(hidden[chosen])
        loss = F.cross_entropy(logits.float(), tokens[chosen])
        acc = (logits.argmax(-1) == tokens[chosen]).float().mean()
        return {"loss": loss, "masked_accuracy": acc.detach()}

    def flops_per_sample(self) -> float:
        n = self.encoder.config.max_tokens
        return self.encoder.flops_per_token(n + 1) * (n + 1) + 6.0 * self.head.weight.numel() * n


@OBJECTIVES.register("mcm", MCMConfig)
def mcm(cfg: MCMConfig, ctx: Context) -> MaskedCodeModeling:
    return MaskedCodeModeling(cfg, ctx)
