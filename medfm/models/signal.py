"""1D signal ViT: each lead is cut into time patches; tokens carry time and lead embeddings.

One token per (lead, time patch) rather than one per time patch over all leads, so that the
model sees which lead a waveform came from and MAE can mask leads independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .base import Encoder, resolve_size, sincos_1d
from .registry import ENCODERS


@dataclass
class SignalViTConfig:
    size: str = "small"
    num_leads: int = 12
    length: int = 2500  # samples per training window (= data.signal_length)
    patch_size: int = 50
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None


class SignalViT(Encoder):
    kind = "signal"

    def __init__(self, cfg: SignalViTConfig):
        super().__init__("signal_vit", cfg)
        dim, depth, heads = resolve_size(cfg.size, cfg.embed_dim, cfg.depth, cfg.num_heads)
        if cfg.length % cfg.patch_size:
            from medfm.config import ConfigError

            raise ConfigError(f"model.length {cfg.length} is not a multiple of model.patch_size")
        self.steps = cfg.length // cfg.patch_size
        self.patch_embed = nn.Linear(cfg.patch_size, dim)
        self.lead_embed = nn.Embedding(cfg.num_leads, dim)
        self.register_buffer("pos_time", sincos_1d(self.steps, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.lead_embed.weight, std=0.02)
        self.embed_dim, self.patch_dim = dim, cfg.patch_size
        self.num_tokens = cfg.num_leads * self.steps

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        want = (self.config.num_leads, self.config.length)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"encoder signal_vit expects (B, leads={want[0]}, samples={want[1]}), got "
                f"{tuple(x.shape)}; set model.num_leads and data.signal_length = model.length"
            )

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        tokens = self.patch_embed(self.patchify(x))  # (B, leads * steps, D), lead-major
        leads = torch.arange(self.config.num_leads, device=x.device).repeat_interleave(self.steps)
        return tokens + self.lead_embed(leads) + self.pos_time.repeat(self.config.num_leads, 1)

    def token_grid(self) -> tuple[int, ...]:
        return (self.config.num_leads, self.steps)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _ = x.shape
        return x.reshape(b, c * self.steps, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return patches.reshape(patches.shape[0], self.config.num_leads, self.config.length)


@ENCODERS.register("signal_vit", SignalViTConfig)
def signal_vit(cfg: SignalViTConfig) -> SignalViT:
    return SignalViT(cfg)
