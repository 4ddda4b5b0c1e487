"""Batch augmentations for contrastive views, one per data kind, driven by a seeded generator.

2D and 1D views are built on the batch tensor on its device (no per-sample Python); 3D views use
MONAI's random array transforms per sample, as MONAI users would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medfm.models.ehr import PAD_ID


@dataclass
class Strength:
    """How hard the views are; tiny models on short runs want milder views than SimCLR's."""

    crop_scale: tuple[float, float] = (0.4, 1.0)  # area fraction of 2D random resized crops
    jitter: float = 0.3  # relative contrast/amplitude range; brightness/offset is a third
    noise: float = 0.03  # Gaussian noise std (normalised intensity units)
    code_dropout: float = 0.15  # EHR codes dropped per view


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def view_image2d(x: torch.Tensor, gen: torch.Generator, strength: Strength) -> torch.Tensor:
    """Random resized crop + horizontal flip + contrast/brightness jitter + Gaussian noise."""
    scale = strength.crop_scale
    n, dev = x.shape[0], x.device
    s = _uniform(n, scale[0], scale[1], gen, dev).sqrt()
    tx, ty = (_uniform(n, -1, 1, gen, dev) * (1 - s) for _ in range(2))
    flip = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s * flip, s, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x.float(), grid, align_corners=False, padding_mode="reflection")
    j = strength.jitter
    contrast = _uniform(n, 1 - j, 1 + j, gen, dev).view(n, 1, 1, 1)
    bright = _uniform(n, -j / 3, j / 3, gen, dev).view(n, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * contrast + mean + bright
    return y + strength.noise * torch.randn(y.shape, generator=gen, device=dev)


def resized_crop_flip(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip (MAE's training transform), on the
    batch: per sample an area fraction in `scale` with a log-uniform aspect ratio in `ratio`,
    resized to `size` (default: the input size; bicubic, as MAE). A crop too wide or
    tall for the image is clamped to it rather than redrawn (torchvision retries 10 times, then
    centre-crops)."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, scale[0], scale[1], gen, dev)
    aspect = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, dev).exp()
    w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    tx, ty = _uniform(n, -1, 1, gen, dev) * (1 - w), _uniform(n, -1, 1, gen, dev) * (1 - h)
    mirror = torch.rand(n, generator=gen, device=dev) < 0.5
    sign = torch.where(mirror & flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = w * sign, h, tx, ty
    out = list(x.shape) if size is None else [*x.shape[:2], *size]
    grid = F.affine_grid(theta, out, align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return y.to(x.dtype)


def resized_crop_flip_3d(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    size: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """RandomResizedCrop's rule on a batch of (B, C, D, H, W) patches, with a flip along each
    axis: per sample a volume fraction in `scale`, shaped by two log-uniform aspect ratios in
    `ratio` (the third axis takes their inverse, so the fraction holds before clamping), resized
    trilinearly to `size` (default: the input size). CT and MR have no preferred handedness for
    self-supervision, so every axis may flip (MONAI's SSL recipes flip all three)."""
    n, dev = x.shape[0], x.device
    volume = _uniform(n, scale[0], scale[1], gen, dev)
    a, b = (_uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, dev) for _ in range(2))
    aspect = torch.stack([a, b, -(a + b)], dim=1).exp()
    side = (volume.pow(1 / 3)[:, None] * aspect).clamp(max=1.0)  # (n, 3), of each axis
    shift = _uniform(3 * n, -1, 1, gen, dev).view(n, 3) * (1 - side)
    sign = torch.where(torch.rand(n, 3, generator=gen, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 3, 4, device=dev)
    axis = torch.arange(3, device=dev)
    theta[:, axis, axis] = side * sign
    theta[:, :, 3] = shift
    out = list(x.shape) if size is None else [*x.shape[:2], *size]
    grid = F.affine_grid(theta, out, align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y.to(x.dtype)


def view_volume3d(x: torch.Tensor, gen: torch.Generator, strength: Strength) -> torch.Tensor:
    """MONAI random flips, intensity scale/shift and Gaussian noise, per sample."""
    from monai.transforms import (
        Compose,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device))
    chain = Compose(
        [
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandScaleIntensity(factors=strength.jitter, prob=1.0),
            RandShiftIntensity(offsets=strength.jitter / 3, prob=1.0),
            RandGaussianNoise(prob=1.0, std=strength.noise),
        ]
    ).set_random_state(seed=seed)
    return torch.stack([torch.as_tensor(chain(v)) for v in x]).to(x.dtype)


def view_signal(x: torch.Tensor, gen: torch.Generator, strength: Strength) -> torch.Tensor:
    """Amplitude scaling, circular time shift (< 10%), baseline offset and noise."""
    n, _, t = x.shape
    dev = x.device
    y = x * _uniform(n, 1 - strength.jitter, 1 + strength.jitter, gen, dev).view(n, 1, 1)
    shift = torch.randint(-t // 10, t // 10 + 1, (n,), generator=gen, device=dev)
    idx = (torch.arange(t, device=dev)[None] - shift[:, None]) % t
    y = torch.gather(y, 2, idx[:, None].expand_as(y))
    y = y + _uniform(n, -strength.jitter / 3, strength.jitter / 3, gen, dev).view(n, 1, 1)
    return y + strength.noise * torch.randn(y.shape, generator=gen, device=dev)


def view_ehr(tokens: torch.Tensor, gen: torch.Generator, drop: float = 0.15) -> torch.Tensor:
    """Random code dropout (dropped codes become padding)."""
    keep = torch.rand(tokens.shape, generator=gen, device=tokens.device) >= drop
    return tokens.masked_fill(~keep, PAD_ID)


def make_view(
    kind: str, x: torch.Tensor, gen: torch.Generator, strength: Strength
) -> tuple[torch.Tensor, Any]:
    """One augmented view; for EHR also its padding mask."""
    if kind == "image2d":
        return view_image2d(x, gen, strength), None
    if kind == "volume3d":
        return view_volume3d(x, gen, strength), None
    if kind == "signal":
        return view_signal(x, gen, strength), None
    tokens = view_ehr(x, gen, strength.code_dropout)
    return tokens, tokens == PAD_ID
