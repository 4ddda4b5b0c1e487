"""A small adapter that runs MONAI or torchvision transforms on our sample dicts.

Augmentation is not re-implemented here. The adapter only maps keys (our "data"/"label_map" to
MONAI's "image"/"label") and seeds every sample's random draws from (seed, epoch, sample), so a
resumed run augments the remaining samples exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

DEFAULT_KEYS = {"data": "image", "label_map": "label"}


def _is_dict_transform(t: Any) -> bool:
    from monai.transforms import Compose, MapTransform

    if isinstance(t, MapTransform):
        return True
    return isinstance(t, Compose) and all(isinstance(x, MapTransform) for x in t.transforms)


def _plain(x: Any) -> Any:
    """MONAI returns MetaTensors; hand plain tensors on so collation and pickling stay cheap."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class ItemTransform:
    """Wrap a MONAI dictionary transform (keys mapped) or an array/torchvision transform (applied
    to item["data"])."""

    def __init__(self, transform: Callable[..., Any], keys: dict[str, str] | None = None):
        self.transform, self.keys = transform, dict(keys or DEFAULT_KEYS)
        self.dictionary = _is_dict_transform(transform)

    def __call__(self, item: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        if seed is None:
            return self._apply(item)
        if hasattr(self.transform, "set_random_state"):  # MONAI draws from its own RandomState
            self.transform.set_random_state(seed=seed % (2**32))
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
            # The CPU generator only, which is all fork_rng(devices=[]) restores: torch.manual_seed
            # would also queue a reseed of every CUDA/XPU device, recording a stack trace each
            # time (3 ms a sample, most of a 28 px image's loading time).
            torch.default_generator.manual_seed(seed)
            return self._apply(item)

    def _apply(self, item: dict[str, Any]) -> dict[str, Any]:
        if not self.dictionary:
            item["data"] = _plain(self.transform(item["data"]))
            return item
        d = {theirs: item[ours] for ours, theirs in self.keys.items() if ours in item}
        out = self.transform(d)
        if isinstance(out, list):
            raise TypeError(
                "transforms that return several samples (e.g. RandCropByPosNegLabeld) are not "
                "supported here; draw patches with PatchSampler instead"
            )
        for ours, theirs in self.keys.items():
            if theirs in out:
                item[ours] = _plain(out[theirs])
        return item


def apply_transform(transform: Callable[..., Any] | None, item: dict[str, Any], seed: int) -> Any:
    """Run `transform` on a sample; ItemTransforms get the sample's seed."""
    if transform is None:
        return item
    if isinstance(transform, ItemTransform):
        return transform(item, seed)
    return transform(item)
