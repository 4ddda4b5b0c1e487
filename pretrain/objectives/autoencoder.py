"""The autoencoder objective: a MONAI `AutoencoderKL` (2D images, 3D patches) trained on L1/L2
reconstruction plus a small KL term, the first stage of latent diffusion.

Registered as objective `autoencoder_kl` (no encoder needed). The engine exports the network as
`autoencoder_kl_autoencoder.safetensors`; a `latent_diffusion` objective names that export
folder and trains in its latent space (medfm.models.diffusion.latent).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.models.diffusion.latent import AutoencoderConfig, build_autoencoder, posterior_sample

from .base import OBJECTIVES, Context, Objective

PREVIEW_SAMPLES = 8


class AutoencoderObjective(Objective):
    """`loss(batch)`: reconstruction (of `data` in [0, 1], mapped to [-1, 1]) + kl_weight * KL of
    the posterior to N(0, I), summed over latent elements and averaged over the batch (as MONAI's
    tutorials weigh it); the posterior noise comes from the engine's per-step generator."""

    kinds = ("image2d", "volume3d")

    def __init__(self, cfg: AutoencoderConfig, ctx: Context | None = None):
        super().__init__("autoencoder_kl", cfg, ctx or Context(encoder=None))
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg)

    def contract_hints(self) -> dict[str, Any]:
        """3D trains on patches of the configured size; 2D images keep their stored size."""
        hints: dict[str, Any] = {"channels": self.cfg.in_channels}
        if self.cfg.spatial_dims == 3:
            hints["patch_size"] = tuple(self.cfg.sample_size)
        return hints

    def check_input(self, x: torch.Tensor) -> None:
        want = (self.cfg.in_channels, *self.cfg.sample_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"autoencoder expects batches of shape (B, {', '.join(map(str, want))}), got "
                f"{tuple(x.shape)}; set sample_size / in_channels to match the shards"
            )

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.check_input(batch["data"])
        x = batch["data"] * 2.0 - 1.0
        z, mu, sigma = posterior_sample(self.autoencoder, x, self._ctx.generator(x.device))
        recon = self.autoencoder.decode(z).float()
        rec = F.l1_loss(recon, x.float()) if self.cfg.loss == "l1" else F.mse_loss(recon, x.float())
        mu, var = mu.float(), sigma.float().pow(2)
        kl = 0.5 * (mu.pow(2) + var - torch.log(var) - 1).flatten(1).sum(1).mean()
        return {"loss": rec + self.cfg.kl_weight * kl, "reconstruction": rec, "kl": kl}

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training images beside their reconstructions (posterior means decoded)."""
        real = batch["data"][:PREVIEW_SAMPLES]
        mu, _ = self.autoencoder.encode(real * 2.0 - 1.0)
        recon = (self.autoencoder.decode(mu).float() + 1.0) / 2.0
        return {"training data": real, "reconstructions": recon.clamp(0, 1)}

    def export_modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder}


@OBJECTIVES.register("autoencoder_kl", AutoencoderConfig)
def autoencoder_kl(cfg: AutoencoderConfig, ctx: Context) -> AutoencoderObjective:
    return AutoencoderObjective(cfg, ctx)
