"""Fast sampling from a trained diffusion model: DDIM or DPM-Solver++ in a few dozen steps.

Each sample's starting noise comes from its own seeded generator, so a sample is reproducible
from (checkpoint, seed, class, sampler settings) alone, whatever batch it was drawn in. With
eta = 0 both samplers are deterministic after the initial noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from .model import DiffusionModel

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


@dataclass
class SamplerSettings:
    sampler: str = "ddim"  # ddim | dpm (DPM-Solver++ multistep)
    steps: int = 50
    eta: float = 0.0  # DDIM only: 0 = deterministic

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {sorted(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_scheduler(model: DiffusionModel, settings: SamplerSettings):
    """The sampler's scheduler, built from the training schedule so the betas match."""
    settings.check()
    cls = SAMPLERS[settings.sampler]
    return cls.from_config(model.scheduler.config)


def initial_noise(
    seeds: list[int], shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """One CPU generator per seed: identical noise on any device and in any batch."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.inference_mode()
def sample(
    model: DiffusionModel,
    seeds: list[int],
    settings: SamplerSettings,
    class_index: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw len(seeds) samples, (B, C, *sample_size) in the contract's [0, 1] space."""
    cfg = model.cfg
    scheduler = make_scheduler(model, settings)
    scheduler.set_timesteps(settings.steps, device=device)
    x = initial_noise(seeds, (cfg.in_channels, *cfg.sample_size), device)
    x = x * scheduler.init_noise_sigma
    labels = None
    if model.conditional:
        if class_index is None or len(class_index) != len(seeds):
            raise ValueError("class-conditional model: give one class index per seed")
        labels = torch.as_tensor(class_index, dtype=torch.long, device=device)
    step_kwargs: dict[str, Any] = {}
    if settings.sampler == "ddim":
        step_kwargs["eta"] = settings.eta
        if settings.eta > 0:
            step_kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seeds[0]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
    for t in scheduler.timesteps:
        with autocast:
            pred = model(scheduler.scale_model_input(x, t), t.expand(len(seeds)), labels)
        x = scheduler.step(pred.float(), t, x, **step_kwargs).prev_sample
    return (x + 1.0) / 2.0
