"""Feature spaces for the audit's fidelity metrics and embedding-space nearest neighbours.

Inception-v3 (the FID standard) cannot be downloaded here, and its ImageNet features are a poor
fit for grey-scale medical images. The audit therefore embeds with one of our own pretrained
encoders (an export of `medfm pretrain`: safetensors + JSON sidecar), or, when none is given,
with a fixed-seed random convolutional network: Naeem et al. (2020, "Reliable Fidelity and
Diversity Metrics for Generative Models") show random embeddings give usable fidelity/diversity
metrics outside ImageNet. The report names the feature space, so figures from different spaces
are never compared by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

RANDOM_FEATURES = "random-conv-v1"


class FeatureSpace(Protocol):
    name: str

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) in [0, 1] -> (N, D) float features."""


class RandomConvFeatures(nn.Module):
    """Three random conv layers + 2^d average pooling: 256 features, identical on any machine."""

    def __init__(self, in_channels: int, spatial_dims: int, seed: int = 0):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        gen = torch.Generator().manual_seed(seed)
        width = 64 if spatial_dims == 2 else 32  # 64*2*2 = 32*2*2*2 = 256 features
        self.layers = nn.ModuleList(
            [conv(in_channels, 16, 3, padding=1), conv(16, 32, 3, 2, 1), conv(32, width, 3, 2, 1)]
        )
        for layer in self.layers:
            fan_in = layer.weight[0].numel()
            layer.weight.data = torch.randn(layer.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
            layer.bias.data.zero_()
        self.pool = pool(2)
        self.name = f"{RANDOM_FEATURES}(seed={seed})"

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * 2 - 1
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.pool(x).flatten(1)


class EncoderFeatures:
    """Pooled (class-token) embeddings of an exported medfm encoder, inputs resized to fit it."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from medfm.models.export import load_encoder

        self.encoder, sidecar = load_encoder(str(path))
        self.encoder.to(device).eval()
        self.device = device
        digest = sidecar["weights"]["sha256"]  # load_encoder checked the weights against it
        self.name = (
            f"medfm-encoder:{sidecar.get('architecture', {}).get('name', '?')}@{digest[:12]}"
        )
        self.size = getattr(self.encoder.config, "img_size", None)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().to(self.device)
        if self.size and x.ndim == 4 and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.encoder.pooled(x).float().cpu()


def feature_space(encoder: str, in_channels: int, spatial_dims: int) -> FeatureSpace:
    """Our exported encoder when a path is given, else the fixed random network."""
    if encoder:
        return EncoderFeatures(encoder)
    return RandomConvFeatures(in_channels, spatial_dims)


def embed_all(space: FeatureSpace, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([space.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
