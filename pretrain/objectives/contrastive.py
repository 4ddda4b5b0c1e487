"""Contrastive objectives: SimCLR (two views of a sample) and CLIP (two modalities of a patient).

Both gather embeddings from every rank *with* gradient (so each rank's negatives include the
whole global batch, as in SimCLR and open_clip) and score each local row against all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .augment import Strength, make_view
from .base import OBJECTIVES, Context, Objective, gather_with_grad, rank


@dataclass
class SimCLRConfig:
    proj_dim: int = 128
    temperature: float = 0.1
    learnable_temperature: bool = False
    views: Strength = field(default_factory=Strength)


@dataclass
class CLIPConfig:
    proj_dim: int = 128
    temperature: float = 0.07
    learnable_temperature: bool = True


def projection(dim: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))


class Temperature(nn.Module):
    """exp(log_scale) = 1 / temperature, clamped at 100 as in CLIP."""

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        value = torch.tensor(math.log(1.0 / temperature))
        self.log_scale = nn.Parameter(value, requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()


def pooled(encoder, x: torch.Tensor, pad_mask, batch: dict[str, Any]) -> torch.Tensor:
    extra = {k: batch[k] for k in ("times", "age") if batch.get(k) is not None}
    return encoder.encode(encoder.tokenize(x, extra), pad_mask)[:, 0]


class SimCLR(Objective):
    kinds = ("image2d", "volume3d", "signal", "ehr")

    def __init__(self, cfg: SimCLRConfig, ctx: Context):
        super().__init__("simclr", cfg, ctx)
        self.head = projection(ctx.encoder.embed_dim, cfg.proj_dim)
        self.scale = Temperature(cfg.temperature, cfg.learnable_temperature)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, gen = batch["data"], self._ctx.generator(batch["data"].device)
        kind = self.encoder.kind
        z = [
            F.normalize(
                self.head(pooled(self.encoder, *make_view(kind, x, gen, self.config.views), batch)),
                dim=-1,
            )
            for _ in range(2)
        ]
        n = z[0].shape[0]
        everyone = torch.cat([gather_with_grad(z[0]), gather_with_grad(z[1])])
        total = everyone.shape[0] // 2
        local = torch.arange(n, device=x.device) + rank() * n
        losses = []
        for v, own, other in ((0, local, local + total), (1, local + total, local)):
            logits = z[v].float() @ everyone.float().T * self.scale()
            logits[torch.arange(n), own] = float("-inf")  # a view is not its own negative
            losses.append(F.cross_entropy(logits, other))
        return {"loss": (losses[0] + losses[1]) / 2, "temperature": 1.0 / self.scale().detach()}

    def flops_per_sample(self) -> float:
        enc = self.encoder
        n = enc.num_tokens or enc.config.max_tokens
        return 2 * enc.flops_per_token(n + 1) * (n + 1)


class CLIP(Objective):
    kinds = ("image2d", "volume3d", "signal", "ehr")
    needs_pair = True

    def __init__(self, cfg: CLIPConfig, ctx: Context):
        super().__init__("clip", cfg, ctx)
        if ctx.pair_encoder is None:
            from medfm.config import ConfigError

            raise ConfigError("objective clip needs pair_model (the second modality's encoder)")
        self.head_a = projection(ctx.encoder.embed_dim, cfg.proj_dim)
        self.head_b = projection(ctx.pair_encoder.embed_dim, cfg.proj_dim)
        self.scale = Temperature(cfg.temperature, cfg.learnable_temperature)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pair = batch["pair"]
        a = pooled(self.encoder, batch["data"], batch.get("pad_mask"), batch)
        b = pooled(self._ctx.pair_encoder, pair["data"], pair.get("pad_mask"), pair)
        a = F.normalize(self.head_a(a), dim=-1)
        b = F.normalize(self.head_b(b), dim=-1)
        all_a, all_b = gather_with_grad(a), gather_with_grad(b)
        target = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
        scale = self.scale()
        loss_a = F.cross_entropy(a.float() @ all_b.float().T * scale, target)
        loss_b = F.cross_entropy(b.float() @ all_a.float().T * scale, target)
        with torch.no_grad():
            acc = ((a @ all_b.T).argmax(-1) == target).float().mean()
        return {"loss": (loss_a + loss_b) / 2, "temperature": 1.0 / scale.detach(), "top1": acc}

    def flops_per_sample(self) -> float:
        total = 0.0
        for enc in (self.encoder, self._ctx.pair_encoder):
            n = enc.num_tokens or enc.config.max_tokens
            total += enc.flops_per_token(n + 1) * (n + 1)
        return total


@OBJECTIVES.register("simclr", SimCLRConfig)
def simclr(cfg: SimCLRConfig, ctx: Context) -> SimCLR:
    return SimCLR(cfg, ctx)


@OBJECTIVES.register("clip", CLIPConfig)
def clip(cfg: CLIPConfig, ctx: Context) -> CLIP:
    return CLIP(cfg, ctx)
