"""Segmentation: one class per voxel (3D) or pixel (2D) from the sample's label map, a UNETR
decoder over the encoder's hidden states, Dice/IoU/HD95/NSD per case."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfm.config import ConfigError

from ..metrics import segmentation_case_metrics, segmentation_metrics
from .base import TASKS, Task

if TYPE_CHECKING:
    from medfm.models import Encoder
    from medfm.models.contract import Contract

    from ..config import EvalConfig, FinetuneConfig, RegionSplitConfig, TaskConfig
    from ..model import FinetuneModel

MAX_LABEL_VALUE = 65536  # label-map values must be below it (the lookup table's size)
SPLITS = ("train", "val", "test")


def validate_region_split(rs: RegionSplitConfig) -> None:
    """task.region_split's checks that need no data (the gap's floor needs the patch)."""
    where = "task.region_split"
    if sorted(rs.slabs) != sorted(SPLITS):
        raise ConfigError(f"{where}.slabs: one fraction each for {SPLITS}, got {list(rs.slabs)}")
    if min(rs.slabs.values()) <= 0 or abs(sum(rs.slabs.values()) - 1) > 1e-6:
        raise ConfigError(f"{where}.slabs: positive fractions that sum to 1, got {rs.slabs}")
    if rs.axis not in (0, 1, 2) or rs.blocks_axis not in (None, 0, 1, 2):
        raise ConfigError(f"{where}: axis and blocks_axis are volume axes, 0, 1 or 2")
    if rs.blocks < 1 or (rs.gap is not None and rs.gap < 0):
        raise ConfigError(f"{where}: blocks must be >= 1 and gap >= 0")


@TASKS.register("segmentation")
class Segmentation(Task):
    """Classes are `task.label_names`, class 0 the background; `task.label_values` gives the
    label-map value of each (other values become background)."""

    pipeline_tag = "image-segmentation"

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self._lut: np.ndarray | None = None

    def validate(self, cfg: FinetuneConfig) -> None:
        super().validate(cfg)
        if self.cfg.region_split is not None:
            validate_region_split(self.cfg.region_split)

    def validate_labels(self) -> None:
        super().validate_labels()
        values = self.cfg.label_values
        if values is not None and len(values) != len(self.label_names):
            raise ConfigError("task.label_values: one label-map value per entry of label_names")

    @property
    def lut(self) -> np.ndarray:
        """Label-map value -> class index; built on first use (it is 512 KiB)."""
        if self._lut is None:
            values = self.cfg.label_values or list(range(len(self.label_names)))
            self._lut = np.zeros(MAX_LABEL_VALUE, np.int64)
            for i, v in enumerate(values):
                self._lut[v] = i
        return self._lut

    def build_head(self, encoder: Encoder) -> nn.Module:
        from ..heads import UNETRDecoder

        ec = encoder.config
        patch = ec.patch_size
        sizes = set(patch) if isinstance(patch, (tuple, list)) else {patch}
        if len(sizes) != 1:
            raise ConfigError(
                f"segmentation head: needs an isotropic encoder patch size, got {patch}"
            )
        img = ec.img_size if isinstance(ec.img_size, (tuple, list)) else (ec.img_size,) * 2
        p = sizes.pop()
        return UNETRDecoder(
            spatial_dims=len(img),
            in_chans=ec.in_chans,
            embed_dim=encoder.embed_dim,
            grid=tuple(s // p for s in img),
            patch_size=p,
            out_channels=len(self.label_names),
        )

    def forward(self, model: FinetuneModel, x: torch.Tensor) -> torch.Tensor:
        from ..heads import encoder_hidden_states

        enc = model.base_encoder()
        hidden = encoder_hidden_states(enc, x, model.head.hidden_indices(len(enc.blocks)))
        return model.head(x, hidden)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)(outputs, targets[:, None])

    def label_classes(
        self, item: dict[str, Any], contract: Contract, resize: bool = False
    ) -> torch.Tensor:
        """Label-map values -> class indices (values not in the table become background).

        3D patches arrive as (1, I, J, K), already patch-sized; 2D maps as (H, W), which
        `resize` brings to the encoder's input size by nearest neighbour, as the image was."""
        lab = item["label_map"]
        classes = torch.from_numpy(self.lut[(lab[0] if lab.ndim == 4 else lab).numpy()])
        size = (contract.image_size,) * 2
        if resize and classes.ndim == 2 and tuple(classes.shape) != size:
            classes = F.interpolate(classes[None, None].float(), size=size, mode="nearest")[0, 0]
        return classes.long()

    def collate_targets(self, items: list[dict[str, Any]], contract: Contract) -> torch.Tensor:
        return torch.stack([self.label_classes(it, contract, resize=True) for it in items])

    def case_metrics(
        self, pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, ...],
        eval_cfg: EvalConfig, full: bool,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Per-class metrics of one case: Dice only (val), or all of them (test)."""
        n_cls = len(self.label_names)
        if full:
            return segmentation_case_metrics(pred, label, n_cls, spacing, eval_cfg.nsd_tolerance_mm)
        from monai.metrics import compute_dice

        p = F.one_hot(pred, n_cls).movedim(-1, 0)[None]
        y = F.one_hot(label, n_cls).movedim(-1, 0)[None]
        return {"dice": compute_dice(p, y, include_background=False, ignore_empty=True)[0].numpy()}

    def val_score(self, cases: list[dict[str, np.ndarray]]) -> float:
        """Mean Dice over val cases (each the mean over its foreground classes)."""
        per_case = [
            np.nanmean(c["dice"]) if np.isfinite(c["dice"]).any() else np.nan for c in cases
        ]
        return float(np.nanmean(per_case)) if np.isfinite(per_case).any() else -np.inf

    def metrics(
        self, cases: list[dict[str, np.ndarray]], patients: list[str], eval_cfg: EvalConfig
    ) -> dict[str, dict[str, float]]:
        return segmentation_metrics(
            cases, patients, eval_cfg.bootstrap, eval_cfg.ci, self.label_names
        )

    def run(
        self,
        model: FinetuneModel,
        root: str,
        contract: Contract,
        cfg: FinetuneConfig,
        device: torch.device,
        out: Path,
    ) -> tuple[dict, dict, dict]:
        from ..segment import run_segmentation

        return run_segmentation(self, model, root, contract, cfg, device, out)
