"""3D ViT: MONAI patch embedding (cubic or anisotropic) + timm transformer blocks.

MONAI's TransformerBlock needs einops (not a dependency) and has no attention-mask input; the
timm Block is the same pre-norm design and is shared with the other encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import PatchEmbeddingBlock
from timm.models.vision_transformer import Block
from torch import nn

from .base import Encoder, patchify_3d, resolve_size, unpatchify_3d
from .registry import ENCODERS


@dataclass
class ViT3DConfig:
    size: str = "base"
    img_size: tuple[int, int, int] = (96, 96, 96)  # the training patch, voxels
    patch_size: tuple[int, int, int] = (16, 16, 16)  # anisotropic allowed, e.g. (16, 16, 4)
    in_chans: int = 1
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None


class ViT3D(Encoder):
    kind = "volume3d"

    def __init__(self, cfg: ViT3DConfig):
        super().__init__("vit3d", cfg)
        dim, depth, heads = resolve_size(cfg.size, cfg.embed_dim, cfg.depth, cfg.num_heads)
        for s, p in zip(cfg.img_size, cfg.patch_size, strict=True):
            if s % p:
                from medfm.config import ConfigError

                raise ConfigError(f"model.img_size {cfg.img_size} is not a multiple of patch_size")
        self.patch_embed = PatchEmbeddingBlock(
            in_channels=cfg.in_chans,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            hidden_size=dim,
            num_heads=heads,
            proj_type="conv",
            pos_embed_type="learnable",
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_size, strict=True))
        self.embed_dim = dim
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        p = cfg.patch_size
        self.patch_dim = p[0] * p[1] * p[2] * cfg.in_chans

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        want = (self.config.in_chans, *self.config.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"encoder vit3d expects volume patches (B, {', '.join(map(str, want))}), got "
                f"{tuple(x.shape)}; set data.patch_size and model.img_size to the same size"
            )

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        return self.patch_embed(x)  # MONAI adds the learnable position embedding here

    def token_grid(self) -> tuple[int, ...]:
        return self.grid

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify_3d(x, self.grid, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify_3d(patches, self.grid, self.config.patch_size, self.config.in_chans)


@ENCODERS.register("vit3d", ViT3DConfig)
def vit3d(cfg: ViT3DConfig) -> ViT3D:
    return ViT3D(cfg)
