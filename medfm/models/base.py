"""The encoder interface every modality implements: tokens in, embeddings out.

`tokenize` turns a batch into position-aware patch tokens (B, N, D); `encode` runs the
transformer over any subset of them (MAE passes only the visible ones) with a class token in
front. `patchify` gives the per-token reconstruction targets. Objectives use only this interface,
so any objective works with any encoder whose data kind it supports.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

# (embed_dim, depth, num_heads), the ViT family sizes used by timm and the MAE paper; huge is
# ViT-H (MAE's largest), giant ViT-g (Zhai et al. 2022, timm's vit_giant_patch14_224, whose MLP
# ratio 48/11 vit2d takes from timm's recipe; the other encoders keep 4).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16),
}


def resolve_size(size: str, embed_dim: int | None, depth: int | None, num_heads: int | None):
    """Named size with optional per-field overrides (tests shrink `tiny` to a few blocks)."""
    from medfm.config import ConfigError

    if size not in SIZES:
        raise ConfigError(f"model.size: unknown size {size!r}; choose from {sorted(SIZES)}")
    d, n, h = SIZES[size]
    return embed_dim or d, depth or n, num_heads or h


class Encoder(nn.Module):
    """Base class; subclasses set the attributes below and implement `tokenize`/`patchify`."""

    kind: str = ""  # shard kind it reads: image2d | volume3d | signal | ehr
    embed_dim: int
    num_tokens: int  # patch tokens per sample (0 when variable, as for EHR)
    patch_dim: int  # values per patch token (the MAE target width)
    blocks: nn.ModuleList
    norm: nn.Module
    cls_token: nn.Parameter

    def __init__(self, name: str, config: Any):
        super().__init__()
        self.name, self.config = name, config

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        """Refuse data of another kind or shape, saying what the encoder expects."""
        self.check_kind(kind)

    def check_kind(self, kind: str | None) -> None:
        if kind is not None and kind != self.kind:
            raise ValueError(
                f"encoder {self.name!r} reads {self.kind} data but the shards hold {kind} "
                f"samples; pick an encoder for {kind} (see `medfm pretrain --list`)"
            )

    def run_block(self, block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None):
        if pad_mask is None:
            return block(x)
        keep = ~pad_mask  # SDPA bool masks: True = may attend
        return block(x, attn_mask=keep[:, None, None, :])

    def encode(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, D) tokens -> (B, 1 + n, D) embeddings; index 0 is the class token."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        if pad_mask is not None:
            pad_mask = torch.cat([pad_mask.new_zeros(pad_mask.shape[0], 1), pad_mask], dim=1)
        for block in self.blocks:
            x = self.run_block(block, x, pad_mask)
        return self.norm(x)

    def forward(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        pad = batch.get("pad_mask") if batch else None
        return self.encode(self.tokenize(x, batch), pad)

    def pooled(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        """One embedding per sample (the class token): what probes and CLIP heads consume."""
        return self.forward(x, batch)[:, 0]

    def block_types(self) -> set[type[nn.Module]]:
        """Transformer block classes: the FSDP wrapping and activation-checkpointing unit."""
        return {type(b) for b in self.blocks}

    def layer_id(self, param_name: str) -> int:
        """0 for embeddings, i + 1 for block i, depth + 1 for the rest (layer-wise LR decay)."""
        if param_name.startswith("blocks.") or ".blocks." in param_name:
            return int(param_name.split("blocks.")[1].split(".")[0]) + 1
        if any(k in param_name for k in ("embed", "cls_token", "pos")):
            return 0
        return len(self.blocks) + 1

    def flops_per_token(self, n_tokens: int) -> float:
        """Training FLOPs per token (fwd + bwd): 6 * block params + attention (nanoGPT/PaLM)."""
        block_params = sum(p.numel() for b in self.blocks for p in b.parameters())
        return 6.0 * block_params + 12.0 * len(self.blocks) * self.embed_dim * n_tokens

    def token_grid(self) -> tuple[int, ...]:
        """Token layout (e.g. (rows, cols)), for the fixed position table of MAE's decoder."""
        return (self.num_tokens,)

    def describe(self) -> dict[str, Any]:
        """The architecture record for export sidecars: registry name + its config."""
        return {"name": self.name, "params": asdict(self.config), "kind": self.kind}


def patchify_3d(x: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, tokens, voxels per patch x C), patches in row-major grid order."""
    (a, b, c), (p, q, r) = grid, patch
    n, ch = x.shape[0], x.shape[1]
    x = x.reshape(n, ch, a, p, b, q, c, r).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(n, a * b * c, p * q * r * ch)


def unpatchify_3d(
    patches: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...], ch: int
) -> torch.Tensor:
    """The inverse of patchify_3d."""
    (a, b, c), (p, q, r) = grid, patch
    x = patches.reshape(-1, a, b, c, p, q, r, ch).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(-1, ch, a * p, b * q, c * r)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed sine-cosine position table (n, dim), as in the Transformer and MAE papers."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32) * (-torch.log(torch.tensor(1e4)) / dim)
    )
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def sincos_grid(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sine-cosine positions over a token grid (prod(grid), dim): dims split per axis,
    the multi-axis form MAE uses for its 2D decoder, generalised to 1D and 3D."""
    per_axis = (dim // len(grid)) // 2 * 2
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    parts = [sincos_1d(n, per_axis)[a.reshape(-1)] for n, a in zip(grid, axes, strict=True)]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))
