"""Real-data shard sets for the synth tests (PneumoniaMNIST from MEDFM_SAMPLE_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medfm.shards import Sample, ShardSetWriter


def npz_path() -> Path:
    root = os.environ.get("MEDFM_SAMPLE_DATA")
    path = Path(root or "/nonexistent", "pneumoniamnist", "pneumoniamnist.npz")
    if not root or not path.exists():
        pytest.skip("MEDFM_SAMPLE_DATA unset or lacks pneumoniamnist/pneumoniamnist.npz")
    return path


def write_pneumonia(root: Path, sizes: dict[str, int], resize: int = 0) -> np.ndarray:
    """A shard set of the first `sizes[split]` images per split; returns the train images."""
    from PIL import Image

    d = np.load(npz_path())
    with ShardSetWriter(str(root)) as w:
        for split, n in sizes.items():
            images, labels = d[f"{split}_images"][:n], d[f"{split}_labels"][:n, 0]
            for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                if resize:
                    img = np.asarray(Image.fromarray(img).resize((resize, resize)))
                w.write(
                    Sample(
                        key=f"pm-{split}-{i:05d}",
                        kind="image2d",
                        modality="CR",
                        dataset="pneumoniamnist",
                        patient_id=f"p-{split}-{i}",
                        split=split,
                        data=img,
                        labels={"class": int(lab)},
                    )
                )
    return d["train_images"][: sizes["train"]]
