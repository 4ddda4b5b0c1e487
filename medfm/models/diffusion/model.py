"""The diffusion network: a denoising UNet (2D images or 3D volume patches) and its noise schedule.

2D uses diffusers' `UNet2DModel`, 3D uses MONAI's `DiffusionModelUNet`; both optionally take a
class embedding. Both share diffusers' `DDPMScheduler` for the forward (noising) process: its
maths is shape-agnostic, and using one scheduler family for training and sampling means the noise
schedule recorded in the export is the one the sampler rebuilds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from medfm.config import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionConfig:
    """One config for 2D and 3D; `spatial_dims` picks the UNet family."""

    spatial_dims: int = 2
    in_channels: int = 1
    sample_size: tuple[int, ...] = (28, 28)  # model input (H, W) or (I, J, K)
    channels: tuple[int, ...] = (32, 64, 64)  # one entry per resolution level
    attention_levels: tuple[bool, ...] = (False, False, True)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_classes: int = 0  # 0 = unconditional; else a class embedding of this size
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"

    def check(self) -> None:
        """Refuse settings the UNets would only reject deep inside a forward pass."""
        check_unet_levels(self)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule: one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type: one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )

    def describe(self) -> dict[str, Any]:
        """The architecture record of the export sidecar."""
        return {"name": "diffusion", "params": asdict(self)}


def check_unet_levels(cfg: Any) -> None:
    """The settings a MONAI UNet or autoencoder (spatial_dims, sample_size, channels,
    attention_levels, norm_num_groups) would only reject deep inside a forward pass."""
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims: 2 or 3, got {cfg.spatial_dims}")
    if len(cfg.sample_size) != cfg.spatial_dims:
        raise ConfigError(
            f"sample_size: needs {cfg.spatial_dims} entries, got {list(cfg.sample_size)}"
        )
    if len(cfg.attention_levels) != len(cfg.channels):
        raise ConfigError("attention_levels: needs one entry per channels entry")
    if any(c % cfg.norm_num_groups for c in cfg.channels):
        raise ConfigError(
            f"channels: each must be divisible by norm_num_groups={cfg.norm_num_groups}"
        )
    factor = 2 ** (len(cfg.channels) - 1)
    if any(s % factor for s in cfg.sample_size):
        raise ConfigError(
            f"sample_size: {list(cfg.sample_size)} must be divisible by {factor} "
            f"({len(cfg.channels)} resolution levels halve it {len(cfg.channels) - 1} times)"
        )


def build_unet(cfg: DiffusionConfig) -> nn.Module:
    cfg.check()
    if cfg.spatial_dims == 2:
        from diffusers import UNet2DModel

        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
        return UNet2DModel(
            sample_size=tuple(cfg.sample_size),
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            block_out_channels=tuple(cfg.channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            attention_head_dim=8,
            add_attention=cfg.attention_levels[-1],  # mid-block attention iff the last level has it
            num_class_embeds=cfg.num_classes or None,
        )
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=8,
        num_class_embeds=cfg.num_classes or None,
    )


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,  # data are not always in [-1, 1] exactly (z-scored MR, say)
    )


class DiffusionModel(nn.Module):
    """The denoising UNet with its training noise schedule and optional class conditioning.

    Its only submodule is `unet`, whose state dict is what an export stores. Inputs live in the
    [-1, 1] space DDPM assumes; the sampler maps its results back to the contract's [0, 1].
    """

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        self.scheduler = build_scheduler(cfg)

    @property
    def conditional(self) -> bool:
        return self.cfg.num_classes > 0

    def check_input(self, x: torch.Tensor) -> None:
        want = (self.cfg.in_channels, *self.cfg.sample_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"diffusion model expects batches of shape (B, {', '.join(map(str, want))}), got "
                f"{tuple(x.shape)}; set sample_size / in_channels to match the shards"
            )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet's prediction (noise or v) for noisy `x` at timesteps `t`."""
        if self.conditional and class_index is None:
            raise ValueError(
                "this diffusion model is class-conditional: the batch needs class_index"
            )
        labels = class_index if self.conditional else None
        if self.cfg.spatial_dims == 2:
            return self.unet(x, t, class_labels=labels).sample
        return self.unet(x, timesteps=t, class_labels=labels)
