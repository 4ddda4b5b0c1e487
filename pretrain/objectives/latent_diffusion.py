"""The latent-diffusion objective: the DDPM simple loss over the scaled latents of a frozen
`autoencoder_kl` export, with classifier-free guidance for class conditioning.

Registered as objective `latent_diffusion` (`autoencoder: <AE run>/export`, no encoder). The
engine exports UNet, autoencoder and latent scale factor together as
`latent_diffusion_latent.safetensors`; `medfm synth generate` samples it (decoding latents with
that autoencoder). The network and sampler live in medfm.models.diffusion.latent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.models.diffusion.latent import (
    LatentDiffusionConfig,
    LatentDiffusionModel,
    load_autoencoder,
    sample_latent,
)
from medfm.models.diffusion.sampling import SamplerSettings

from .base import OBJECTIVES, Context, Objective
from .diffusion import check_class_count, noised

PREVIEW_SAMPLES, PREVIEW_STEPS = 8, 20


class LatentDiffusionObjective(Objective):
    """`loss(batch)`: encode `data` ([0, 1]) with the frozen autoencoder (posterior sample,
    scaled; the first batch fixes the scale factor), noise the latents, regress noise or v.
    Class-conditional models need `class_index` (data.class_key); each label becomes the null
    class with probability class_dropout, which is what guidance at sampling contrasts with."""

    kinds = ("image2d", "volume3d")

    def __init__(self, cfg: LatentDiffusionConfig, ctx: Context | None = None):
        super().__init__("latent_diffusion", cfg, ctx or Context(encoder=None))
        cfg.check()
        self.cfg = cfg
        ae = load_autoencoder(cfg.autoencoder)
        self.model = LatentDiffusionModel(cfg, ae.cfg)
        self.model.autoencoder.load_state_dict(ae.model.state_dict())

    def check_classes(self, classes: list[Any]) -> None:
        check_class_count(self.model.conditional, self.cfg.num_classes, classes)

    def contract_hints(self) -> dict[str, Any]:
        hints: dict[str, Any] = {"channels": self.model.ae_cfg.in_channels}
        if self.model.ae_cfg.spatial_dims == 3:
            hints["patch_size"] = self.model.image_size
        return hints

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.model.check_input(batch["data"])
        gen = self._ctx.generator(batch["data"].device)
        z0 = self.model.encode(batch["data"], gen)
        diff = self.model.diffusion
        zt, t, target = noised(diff.scheduler, z0, gen, diff.cfg.prediction_type)
        labels = None
        if self.model.conditional:
            drop = torch.rand(len(z0), generator=gen, device=z0.device) < self.cfg.class_dropout
            labels = torch.where(drop, self.model.null_class, batch["class_index"])
        pred = diff(zt, t, labels)
        return {
            "loss": F.mse_loss(pred.float(), target.float()),
            "scale_factor": self.model.scale_factor,
        }

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Training images beside decoded samples (a few DDIM steps; classes in turn)."""
        if not self.model.scale_factor > 0:
            return None
        real = batch["data"][:PREVIEW_SAMPLES]
        n = len(real)
        labels = [i % self.cfg.num_classes for i in range(n)] if self.model.conditional else None
        was_training = self.model.training
        self.model.eval()
        settings = SamplerSettings("ddim", PREVIEW_STEPS)
        x = sample_latent(self.model, list(range(n)), settings, labels, device=real.device)
        self.model.train(was_training)
        return {"training data": real, "samples": x}

    def export_modules(self) -> dict[str, nn.Module]:
        return {"latent": self.model}


@OBJECTIVES.register("latent_diffusion", LatentDiffusionConfig)
def latent_diffusion(cfg: LatentDiffusionConfig, ctx: Context) -> LatentDiffusionObjective:
    return LatentDiffusionObjective(cfg, ctx)
