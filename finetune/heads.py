"""Task heads over encoder features.

Classification and regression heads read the pooled (class-token) embedding. The segmentation
head is UNETR's decoder (Hatamizadeh et al. 2022) built from MONAI's blocks: hidden states of
evenly spaced transformer blocks are reshaped to the patch grid, upsampled to successive scales
and fused with a convolutional stem on the raw input, for 2D and 3D ViTs alike.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medfm.config import ConfigError


class LinearHead(nn.Module):
    """Pooled embedding -> logits (classification) or values (regression).

    A parameter-free BatchNorm standardises each feature first, as in MAE's linear probe:
    pretrained features differ in scale by orders of magnitude, which a plain linear layer
    trained for a few epochs cannot undo. Its statistics are a plain average over the epoch
    (momentum None, reset each epoch by the trainer), never blended with the initial 0/1."""

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6, momentum=None)
        self.fc = nn.Linear(embed_dim, out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


class UNETRDecoder(nn.Module):
    """UNETR decoder for a ViT with isotropic power-of-two patches (2D or 3D)."""

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        embed_dim: int,
        grid: tuple[int, ...],
        patch_size: int,
        out_channels: int,
        feature_size: int = 16,
    ):
        super().__init__()
        levels = int(math.log2(patch_size)) if patch_size > 1 else 0
        if patch_size < 2 or 2**levels != patch_size:
            raise ConfigError(
                f"segmentation head: patch size {patch_size} must be a power of two >= 2"
            )
        self.grid, self.levels, self.spatial_dims = tuple(grid), levels, spatial_dims
        common = dict(spatial_dims=spatial_dims, norm_name="instance", res_block=True)
        self.stem = UnetrBasicBlock(
            in_channels=in_chans, out_channels=feature_size, kernel_size=3, stride=1, **common
        )
        # Skip j (1 .. levels-1) lives at 1/2^j resolution: upsample the grid by 2^(levels-j).
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=embed_dim,
                out_channels=feature_size * 2**j,
                num_layer=levels - j - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **common,
            )
            for j in range(1, levels)
        )
        channels = [feature_size * 2**j for j in range(levels)] + [embed_dim]
        self.ups = nn.ModuleList(
            UnetrUpBlock(
                in_channels=channels[j + 1],
                out_channels=channels[j],
                kernel_size=3,
                upsample_kernel_size=2,
                **common,
            )
            for j in range(levels)
        )
        self.out = UnetOutBlock(
            spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels
        )

    def hidden_indices(self, depth: int) -> list[int]:
        """Which blocks feed the skips and the bottleneck: evenly spaced, the last one last."""
        return [round(i * (depth - 1) / max(self.levels - 1, 1)) for i in range(self.levels)]

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, D, *grid)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """`hidden`: patch-token states (no class token) of the blocks in `hidden_indices`."""
        feats = [self.stem(x)] + [
            skip(self.to_grid(h)) for skip, h in zip(self.skips, hidden[:-1], strict=False)
        ]
        y = self.to_grid(hidden[-1])
        for j in reversed(range(self.levels)):
            y = self.ups[j](y, feats[j])
        return self.out(y)


def encoder_hidden_states(
    encoder: nn.Module, x: torch.Tensor, indices: list[int]
) -> list[torch.Tensor]:
    """Patch-token outputs of the chosen blocks (class token dropped); the last one normed."""
    tokens = encoder.tokenize(x)
    cls = encoder.cls_token.expand(tokens.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1)
    out = []
    last = len(encoder.blocks) - 1
    for i, block in enumerate(encoder.blocks):
        h = block(h)
        if i in indices:
            state = encoder.norm(h) if i == last else h
            out += [state[:, 1:]] * indices.count(i)
    return out
