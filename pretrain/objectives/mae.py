"""Masked autoencoding (He et al., 2022) for 2D, 3D and 1D encoders.

The encoder sees only the visible (1 - mask_ratio) tokens; a small decoder fills in mask tokens
and regresses the pixels of the masked patches. `norm_pix_loss` defaults to off: on chest X-rays
per-patch normalization amplifies noise in flat regions (facebookresearch/mae issue #190).

2D images can get MAE's training transform, RandomResizedCrop(scale=(0.2, 1.0)) + horizontal
flip (`crop_scale`, `hflip`). Both default to off so that runs from before they existed resume
unchanged; the packaged 2D recipes switch them on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from medfm.config import ConfigError
from medfm.models.base import sincos_grid

from .augment import resized_crop_flip
from .base import OBJECTIVES, Context, Objective

AUGMENT_SALT = 0xA06  # the crop/flip stream differs from the mask stream of the same step


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix_loss: bool = False
    crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range; MAE (0.2, 1)
    hflip: bool = False  # random horizontal flip (p = 0.5)


def random_masking(n: int, tokens: int, keep: int, gen: torch.Generator, device) -> tuple:
    """Per-sample random permutation: (indices kept, restore order, mask with 1 = masked)."""
    noise = torch.rand(n, tokens, generator=gen, device=device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, tokens, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, torch.gather(mask, 1, restore)


class MAE(Objective):
    kinds = ("image2d", "volume3d", "signal")

    def __init__(self, cfg: MAEConfig, ctx: Context):
        super().__init__("mae", cfg, ctx)
        if not 0.0 < cfg.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        enc = ctx.encoder
        check_augment(cfg, enc.kind)
        n = enc.num_tokens
        self.keep = max(1, int(round(n * (1 - cfg.mask_ratio))))
        self.decoder_embed = nn.Linear(enc.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        # Fixed sine-cosine positions, as in MAE: a learned table starts near zero and leaves
        # the decoder position-blind for hundreds of steps (no interpolation between patches).
        table = torch.cat(
            [torch.zeros(1, cfg.decoder_dim), sincos_grid(enc.token_grid(), cfg.decoder_dim)]
        )
        self.register_buffer("decoder_pos", table[None], persistent=False)
        self.decoder = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, enc.patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_masked(self, x: torch.Tensor, batch: dict[str, Any]):
        enc = self.encoder
        tokens = enc.tokenize(x, batch)
        n, t, d = tokens.shape
        kept, restore, mask = random_masking(
            n, t, self.keep, self._ctx.generator(x.device), x.device
        )
        visible = torch.gather(tokens, 1, kept[..., None].expand(-1, -1, d))
        latent = self.decoder_embed(enc.encode(visible))
        filler = self.mask_token.expand(n, t - self.keep, -1)
        body = torch.cat([latent[:, 1:], filler], dim=1)
        body = torch.gather(body, 1, restore[..., None].expand(-1, -1, body.shape[-1]))
        y = torch.cat([latent[:, :1], body], dim=1) + self.decoder_pos
        for block in self.decoder:
            y = block(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:], mask

    def target(self, x: torch.Tensor) -> torch.Tensor:
        target = self.encoder.patchify(x)
        if self.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The configured crop/flip of this step's batch (seeded: the same after a resume)."""
        cfg = self.config
        if cfg.crop_scale is None and not cfg.hflip:
            return x
        gen = torch.Generator(device=x.device).manual_seed(self._ctx.seed ^ AUGMENT_SALT)
        if cfg.crop_scale is None:  # flip only: the crop is the whole image
            return resized_crop_flip(x, gen, (1.0, 1.0), (1.0, 1.0), flip=True)
        return resized_crop_flip(x, gen, tuple(cfg.crop_scale), flip=cfg.hflip)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self.augment(batch["data"])
        pred, mask = self.forward_masked(x, batch)
        per_token = ((pred.float() - self.target(x).float()) ** 2).mean(-1)
        return {"loss": (per_token * mask).sum() / mask.sum()}

    def flops_per_sample(self) -> float:
        enc, n = self.encoder, self.encoder.num_tokens
        embed = 6.0 * sum(p.numel() for p in enc.parameters() if p.ndim > 1) - 6.0 * sum(
            p.numel() for b in enc.blocks for p in b.parameters() if p.ndim > 1
        )
        dec_params = sum(p.numel() for b in self.decoder for p in b.parameters())
        dec_dim = self.config.decoder_dim
        decoder = (6.0 * dec_params + 12.0 * len(self.decoder) * dec_dim * (n + 1)) * (n + 1)
        head = 6.0 * (self.decoder_pred.weight.numel() + self.decoder_embed.weight.numel()) * n
        return enc.flops_per_token(self.keep + 1) * (self.keep + 1) + embed * n + decoder + head

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["data"][:8]
        pred, mask = self.forward_masked(x, {k: v[:8] for k, v in batch.items() if k == "data"})
        enc = self.encoder
        target = enc.patchify(x)
        if self.config.norm_pix_loss:  # undo the per-patch normalization for display
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        masked = enc.unpatchify(target * (1 - mask[..., None]))
        pasted = enc.unpatchify(target * (1 - mask[..., None]) + pred * mask[..., None])
        return {"input": x, "masked": masked, "reconstruction": pasted}


def check_augment(cfg: MAEConfig, kind: str) -> None:
    if (cfg.crop_scale is not None or cfg.hflip) and kind != "image2d":
        raise ConfigError(f"mae.crop_scale/hflip: 2D images only; this encoder takes {kind} data")
    if cfg.crop_scale is not None:
        lo, hi = cfg.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"mae.crop_scale must satisfy 0 < low <= high <= 1, got {lo}, {hi}")


@OBJECTIVES.register("mae", MAEConfig)
def mae(cfg: MAEConfig, ctx: Context) -> MAE:
    return MAE(cfg, ctx)
