"""Memorization: is a synthetic sample a (near) copy of a training sample?

For every synthetic sample we find its nearest real training sample twice: in pixel space by
normalized (Pearson) correlation, and in embedding space by cosine similarity. What counts as
"too close" is calibrated, not guessed: real held-out samples were never trained on, so the
similarity of a held-out sample to its nearest training sample is what an honest new sample
looks like. The flag threshold is the (1 - q) quantile of that distribution: only a fraction
q of genuinely new real images would be flagged (Carlini et al. 2023 and Dar et al. 2024 audit
diffusion models the same way, by nearest-neighbour similarity to the training set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_SIDE_2D, PIXEL_SIDE_3D = 64, 32  # copies survive this much downsampling; cost stays low


def pixel_vectors(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> unit-norm, zero-mean rows: dot products are Pearson correlations."""
    side = PIXEL_SIDE_2D if x.ndim == 4 else PIXEL_SIDE_3D
    if max(x.shape[2:]) > side:
        pool = F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d
        x = pool(x.float(), tuple(min(s, side) for s in x.shape[2:]))
    v = x.float().flatten(1)
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)


def unit_rows(f: torch.Tensor) -> torch.Tensor:
    return f.float() / f.float().norm(dim=1, keepdim=True).clamp_min(1e-8)


def nearest(query: torch.Tensor, bank: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, ...]:
    """(similarity, index) of each query row's most similar bank row (rows unit-norm)."""
    sims, idx = [], []
    for i in range(0, len(query), chunk):
        s = query[i : i + chunk] @ bank.T
        best = s.max(1)
        sims.append(best.values)
        idx.append(best.indices)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


@dataclass
class Calibration:
    pixel_threshold: float
    embedding_threshold: float
    quantile: float
    heldout: int
    heldout_exact_duplicates: int  # held-out samples identical to a training sample

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def calibrate(
    heldout_pix: torch.Tensor,
    heldout_emb: torch.Tensor,
    train_pix: torch.Tensor,
    train_emb: torch.Tensor,
    quantile: float,
) -> tuple[Calibration, np.ndarray]:
    """Thresholds from held-out -> train nearest-neighbour similarities; also returns them."""
    if len(heldout_pix) < 10:
        raise ValueError(
            f"calibration needs at least 10 real held-out samples, got {len(heldout_pix)}"
        )
    pix, _ = nearest(heldout_pix, train_pix)
    emb, _ = nearest(heldout_emb, train_emb)
    cal = Calibration(
        pixel_threshold=float(np.quantile(pix, 1 - quantile)),
        embedding_threshold=float(np.quantile(emb, 1 - quantile)),
        quantile=quantile,
        heldout=len(pix),
        heldout_exact_duplicates=int((pix > 0.9999).sum()),
    )
    return cal, pix


@dataclass
class Matches:
    """Per synthetic sample: nearest training sample and similarity, in both spaces."""

    pixel_similarity: np.ndarray
    pixel_index: np.ndarray
    embedding_similarity: np.ndarray
    embedding_index: np.ndarray

    def flagged(self, cal: Calibration) -> np.ndarray:
        # A sample closer to a training sample than (1 - q) of new real images are, in either
        # space. Exact copies (similarity ~1) are flagged even if held-out data leaked copies
        # into the calibration and pushed a threshold to 1.
        pix_thr = min(cal.pixel_threshold, 0.9999)
        emb_thr = min(cal.embedding_threshold, 0.9999)
        return (self.pixel_similarity > pix_thr) | (self.embedding_similarity > emb_thr)


def match(
    synth_pix: torch.Tensor,
    synth_emb: torch.Tensor,
    train_pix: torch.Tensor,
    train_emb: torch.Tensor,
) -> Matches:
    ps, pi = nearest(synth_pix, train_pix)
    es, ei = nearest(synth_emb, train_emb)
    return Matches(ps, pi, es, ei)
