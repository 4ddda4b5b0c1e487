"""Fidelity and diversity metrics: Fréchet distance, precision/recall/density/coverage, MS-SSIM.

All take features or images as tensors; the audit decides which feature space they live in.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. (2003) scale weights


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), the FID formula, in float64."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    x, y = a.double().numpy(), b.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularize as the FID reference does
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density, coverage (Naeem et al. 2020)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall need more than k={k} samples on each side")
    real, fake = real.float(), fake.float()
    rr = torch.cdist(real, real)
    ff = torch.cdist(fake, fake)
    rf = torch.cdist(real, fake)  # (R, F)
    r_radius = rr.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0
    f_radius = ff.kthvalue(k + 1, dim=1).values
    inside_real = rf < r_radius[:, None]  # fake j inside real i's k-NN ball
    return {
        "precision": inside_real.any(0).float().mean().item(),
        "recall": (rf < f_radius[None, :]).any(1).float().mean().item(),
        "density": (inside_real.sum(0).float() / k).mean().item(),
        "coverage": (rf.min(1).values < r_radius).float().mean().item(),
    }


def msssim_scales(spatial: tuple[int, ...], kernel: int) -> int:
    """How many MS-SSIM scales fit: each halves the image, the last must still hold the kernel
    (torchmetrics' rule: side > (kernel - 1) * 2^(scales - 1))."""
    side, scales = min(spatial), 1
    while scales < len(MSSSIM_BETAS) and side > (kernel - 1) * 2**scales:
        scales += 1
    return scales


def mean_msssim(images: torch.Tensor, pairs: int, seed: int = 0) -> float:
    """Mean MS-SSIM over random distinct pairs; higher means less diverse (1 = identical)."""
    n = len(images)
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 samples")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never pair a sample with itself
    kernel = 7 if min(images.shape[2:]) >= 28 else 3
    scales = msssim_scales(tuple(images.shape[2:]), kernel)
    betas = MSSSIM_BETAS[:scales]
    x = images.float()
    score = multiscale_structural_similarity_index_measure(
        x[i],
        x[j],
        gaussian_kernel=False,  # a uniform window of `kernel`: gaussian ones outgrow small images
        kernel_size=kernel,
        betas=tuple(b / sum(betas) for b in betas),
        data_range=1.0,
    )
    return float(score)
