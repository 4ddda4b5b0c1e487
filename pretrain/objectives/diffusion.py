"""The diffusion objective: the DDPM simple loss over a `DiffusionModel` (2D images, 3D patches).

Registered as objective `diffusion` in the engine's registry (no encoder needed: the model's
UNet is what gets exported, through `export_modules`). The network, its export and the sampler
live in `medfm.models.diffusion`, usable without this engine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.config import ConfigError
from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
from medfm.models.diffusion.sampling import SamplerSettings, sample

from .base import OBJECTIVES, Context, Objective

PREVIEW_SAMPLES, PREVIEW_STEPS = 8, 20  # the PNG grid at checkpoints: cheap, still recognisable


class DiffusionObjective(Objective):
    """Owns the denoising model; `loss(batch)` is the DDPM simple loss (MSE on noise or v).

    The batch holds `data`: (B, C, *sample_size) in [0, 1] (the engine's `unit`/`window`
    intensity contract), mapped here to the [-1, 1] range DDPM assumes; class-conditional models
    also need `class_index`: (B,) integers, which the engine adds with `data.class_key`. Noise
    and timesteps come from the engine's per-step generator, so a resumed run draws the same ones.
    """

    kinds = ("image2d", "volume3d")

    def __init__(self, cfg: DiffusionConfig, ctx: Context | None = None):
        super().__init__("diffusion", cfg, ctx or Context(encoder=None))
        self.cfg = cfg
        self.model = DiffusionModel(cfg)

    def check_classes(self, classes: list[Any]) -> None:
        check_class_count(self.model.conditional, self.cfg.num_classes, classes)

    def contract_hints(self) -> dict[str, Any]:
        """3D trains on patches of the UNet's sample size; 2D images keep their stored size."""
        hints: dict[str, Any] = {"channels": self.cfg.in_channels}
        if self.cfg.spatial_dims == 3:
            hints["patch_size"] = tuple(self.cfg.sample_size)
        return hints

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x0 = batch["data"] * 2.0 - 1.0
        self.model.check_input(x0)
        gen = self._ctx.generator(x0.device)
        xt, t, target = noised(self.model.scheduler, x0, gen, self.cfg.prediction_type)
        pred = self.model(xt, t, batch.get("class_index"))
        return {"loss": F.mse_loss(pred.float(), target.float())}

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training images beside fresh samples (a few DDIM steps; classes in turn)."""
        real = batch["data"][:PREVIEW_SAMPLES]
        n = len(real)
        labels = [i % self.cfg.num_classes for i in range(n)] if self.model.conditional else None
        was_training = self.model.training
        self.model.eval()
        settings = SamplerSettings("ddim", PREVIEW_STEPS)
        x = sample(self.model, list(range(n)), settings, labels, real.device)
        self.model.train(was_training)
        return {"training data": real, "samples": x.clamp(0, 1)}

    def export_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints written while the objective owned the UNet itself name it `<prefix>unet.`;
        # renaming those keys keeps such runs resumable (the optimizer state is by position).
        old = f"{prefix}unet."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}model.{key[len(prefix) :]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


def check_class_count(conditional: bool, num_classes: int, classes: list[Any]) -> None:
    """A class-conditional objective needs data.class_key to give exactly its classes."""
    if conditional and len(classes) != num_classes:
        found = f"{len(classes)} classes {classes}" if classes else "no classes"
        raise ConfigError(
            f"num_classes: the objective is {num_classes}-class conditional but the data give "
            f"{found}; set data.class_key to the labels key to condition on"
        )


def noised(scheduler: Any, x0: torch.Tensor, gen: torch.Generator, prediction_type: str):
    """A DDPM training step's inputs: noise, then timesteps, from the step's generator (a
    resumed run draws the same), the noised x_t and the target (the noise, or v)."""
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (x0.shape[0],), generator=gen, device=x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return xt, t, target


@OBJECTIVES.register("diffusion", DiffusionConfig)
def diffusion(cfg: DiffusionConfig, ctx: Context) -> DiffusionObjective:
    return DiffusionObjective(cfg, ctx)
