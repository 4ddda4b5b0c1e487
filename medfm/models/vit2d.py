"""2D ViTs from timm (tiny..giant), 1 or 3 input channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch

from .base import Encoder, resolve_size
from .registry import ENCODERS

# timm has no patch-16 ViT-H or ViT-g; their patch-14 recipes differ only in the patch size,
# which patch_size overrides.
TIMM_RECIPE = {"huge": "vit_huge_patch14_224", "giant": "vit_giant_patch14_224"}


@dataclass
class ViT2DConfig:
    size: str = "base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0


class ViT2D(Encoder):
    """timm's VisionTransformer, with patch embedding and blocks used separately for masking."""

    kind = "image2d"

    def __init__(self, cfg: ViT2DConfig):
        super().__init__("vit2d", cfg)
        dim, depth, heads = resolve_size(cfg.size, cfg.embed_dim, cfg.depth, cfg.num_heads)
        # timm's named model supplies the recipe (qkv bias, init); our fields override its size.
        vit = timm.create_model(
            TIMM_RECIPE.get(cfg.size, f"vit_{cfg.size}_patch16_224"),
            pretrained=False,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            no_embed_class=True,  # pos_embed covers patches only, so it can be gathered by mask
            drop_path_rate=cfg.drop_path,
        )
        self.patch_embed, self.pos_embed, self.cls_token = (
            vit.patch_embed,
            vit.pos_embed,
            vit.cls_token,
        )
        self.blocks, self.norm = vit.blocks, vit.norm
        self.embed_dim = dim
        self.num_tokens = self.patch_embed.num_patches
        self.patch_dim = cfg.patch_size**2 * cfg.in_chans

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        c, s = self.config.in_chans, self.config.img_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(
                f"encoder vit2d expects image batches (B, {c}, {s}, {s}), got {tuple(x.shape)}; "
                f"set model.in_chans / model.img_size to match the shards"
            )

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed

    def token_grid(self) -> tuple[int, ...]:
        return tuple(self.patch_embed.grid_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_chans
        g = self.config.img_size // p
        x = patches.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, g * p, g * p)


@ENCODERS.register("vit2d", ViT2DConfig)
def vit2d(cfg: ViT2DConfig) -> ViT2D:
    return ViT2D(cfg)
