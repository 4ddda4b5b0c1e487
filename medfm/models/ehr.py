"""EHR transformer over code tokens, with time-delta and age embeddings.

A patient's record is a sequence of integer codes (diagnoses, labs, drugs, ...). Positions are
not evenly spaced in time, so besides the token position we embed the time since the previous
event (log-scaled hours) and the patient's age at the event (years), both as sinusoidal features
through a linear layer: continuous, so unseen gaps and ages still embed sensibly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .base import Encoder, resolve_size, sincos_1d
from .registry import ENCODERS

PAD_ID = 0  # token 0 pads sequences; the last id of the vocabulary is the [MASK] token


@dataclass
class EHRConfig:
    size: str = "small"
    vocab_size: int = 32768  # includes PAD (0); [MASK] = vocab_size - 1
    max_tokens: int = 256
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None


def continuous_features(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a real value at geometric frequencies (dim must be even)."""
    freq = torch.exp(torch.linspace(0, -6.0, dim // 2, device=values.device))
    angles = values[..., None].float() * freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class EHRTransformer(Encoder):
    kind = "ehr"

    def __init__(self, cfg: EHRConfig):
        super().__init__("ehr_transformer", cfg)
        dim, depth, heads = resolve_size(cfg.size, cfg.embed_dim, cfg.depth, cfg.num_heads)
        self.token_embed = nn.Embedding(cfg.vocab_size, dim, padding_idx=PAD_ID)
        self.register_buffer("pos_embed", sincos_1d(cfg.max_tokens, dim), persistent=False)
        self.time_embed = nn.Linear(dim, dim)
        self.age_embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.embed_dim, self.patch_dim, self.num_tokens = dim, 1, 0
        self.mask_id = cfg.vocab_size - 1

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        if x.ndim != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"encoder ehr_transformer expects integer token batches (B, L), got "
                f"{tuple(x.shape)} {x.dtype}"
            )
        if int(x.max()) >= self.config.vocab_size:
            raise ValueError(
                f"token id {int(x.max())} >= model.vocab_size {self.config.vocab_size}"
            )

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        batch = batch or {}
        tokens = self.token_embed(x) + self.pos_embed[: x.shape[1]]
        dim = self.embed_dim
        if batch.get("times") is not None:  # hours since admission/first event, per token
            t = batch["times"].float()
            delta = torch.diff(t, dim=1, prepend=t[:, :1]).clamp_min(0)
            tokens = tokens + self.time_embed(continuous_features(torch.log1p(delta), dim))
        if batch.get("age") is not None:  # years, per sample or per token
            age = batch["age"].float()
            age = age[:, None].expand_as(x) if age.ndim == 1 else age
            tokens = tokens + self.age_embed(continuous_features(age / 10.0, dim))
        return tokens

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., None]


@ENCODERS.register("ehr_transformer", EHRConfig)
def ehr_transformer(cfg: EHRConfig) -> EHRTransformer:
    return EHRTransformer(cfg)
