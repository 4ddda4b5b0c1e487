"""Any timm model as the 2D encoder: `model: {name: timm, arch: convnext_tiny, pretrained: PATH}`.

Two ways a timm model becomes patch tokens:
- ViTs (timm's `vision_transformer` module: vit_*, deit3 ...): the patch embedding, positions and
  blocks are used separately, as in `vit2d`, so MAE can drop masked tokens before the blocks run;
- every other arch (ConvNeXt, ResNet, Swin, ...): its final feature map is the token grid, and
  token 0 is the mean of the grid. Such tokens have already seen the whole image, so masking them
  teaches nothing: MAE refuses these archs (contrastive objectives and fine-tuning use them).

`pretrained` initialises from a local safetensors or timm/PyTorch checkpoint (the model's own
`state_dict`), or from `hf-hub:ORG/NAME` (its `model.safetensors`, through the Hugging Face cache;
`HF_HUB_OFFLINE=1` works from the cache). Position embeddings are interpolated to this model's
grid; a checkpoint's class-token position slot is folded into `cls_token` (our ViTs keep no
position for it, so positions can be gathered by mask: the first block sees the same input); an
RGB first convolution is adapted to `in_chans`. Missing and unexpected keys are logged and kept in
`encoder.load_report`.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from medfm.config import ConfigError

from .base import Encoder
from .registry import ENCODERS

log = logging.getLogger(__name__)

VIT_MODULE = "timm.models.vision_transformer"
HF_HUB = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a folder, first found wins


@dataclass
class TimmConfig:
    arch: str = "vit_tiny_patch16_224"
    img_size: int = 224
    in_chans: int = 1
    pretrained: str | None = None  # checkpoint file or folder, or hf-hub:ORG/NAME
    patch_size: int | None = None  # ViT archs: None keeps the arch's
    embed_dim: int | None = None  # ViT archs: override the arch's size (tests shrink it)
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # more timm.create_model arguments


def create(cfg: TimmConfig, is_vit: bool) -> nn.Module:
    """The timm model without a classifier; sizes apply to ViTs only (CNNs take no such args)."""
    sizes = {k: v for k, v in [("embed_dim", cfg.embed_dim), ("depth", cfg.depth),
                               ("num_heads", cfg.num_heads), ("patch_size", cfg.patch_size)]
             if v is not None}  # fmt: skip
    if sizes and not is_vit:
        raise ConfigError(
            f"model.{next(iter(sizes))}: sizes apply to ViT archs only; {cfg.arch!r} is not one "
            "(pick a smaller arch instead, e.g. convnext_atto, resnet18)"
        )
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": cfg.in_chans, **sizes}
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.arch)
    if is_vit or (pretrained_cfg is not None and pretrained_cfg.fixed_input_size):
        kwargs["img_size"] = cfg.img_size  # position tables and windows are built for one size
    if is_vit:
        kwargs["no_embed_class"] = True  # pos_embed covers patches only: gathered by mask
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    clash = sorted(set(kwargs) & set(cfg.options))
    if clash:
        raise ConfigError(f"model.options.{clash[0]}: set by the encoder (use model.* fields)")
    try:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs, **cfg.options)
    except (TypeError, ValueError, AssertionError) as e:  # timm's refusals of bad arguments
        raise ConfigError(
            f"model: timm.create_model({cfg.arch!r}) refused the settings: {e}"
        ) from e


def check_arch(arch: str) -> bool:
    """True for a ViT arch; an unknown name fails with the closest timm names."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.arch: timm has no model {arch!r}; did you mean {close}?")
    return timm.models.model_entrypoint(arch).__module__ == VIT_MODULE


class TimmEncoder(Encoder):
    """A timm model behind the token interface (see the module docstring for the two paths)."""

    kind = "image2d"

    def __init__(self, cfg: TimmConfig):
        super().__init__("timm", cfg)
        self.is_vit = check_arch(cfg.arch)
        model = create(cfg, self.is_vit)
        self.first_conv = (model.pretrained_cfg.get("first_conv") or "") + ".weight"
        if self.is_vit:
            if model.num_prefix_tokens != 1:
                raise ConfigError(
                    f"model.arch: {cfg.arch!r} has {model.num_prefix_tokens} prefix tokens "
                    "(register or distillation tokens); only a single class token is supported"
                )
            self.patch_embed, self.pos_embed, self.cls_token = (
                model.patch_embed,
                model.pos_embed,
                model.cls_token,
            )
            self.norm_pre, self.blocks, self.norm = model.norm_pre, model.blocks, model.norm
            self.grid = tuple(model.patch_embed.grid_size)
            self.patch = model.patch_embed.patch_size[0]
        else:
            self.backbone = model
            self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # Swin: NHWC
            self.blocks, self.norm = nn.ModuleList(), nn.Identity()  # the backbone runs in tokenize
            self.grid = self._feature_grid(cfg)
        self.embed_dim = model.num_features
        self.num_tokens = math.prod(self.grid)
        self.load_report: dict[str, list[str]] = {}
        if cfg.pretrained:
            self.load_report = load_pretrained(self, cfg.pretrained)

    @torch.no_grad()
    def _feature_grid(self, cfg: TimmConfig) -> tuple[int, int]:
        """(rows, cols) of the backbone's feature map at `img_size`, from one probe image."""
        was_training = self.backbone.training
        self.backbone.eval()  # the probe must not move batch-norm statistics
        probe = self.tokens_2d(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size))
        self.backbone.train(was_training)
        return tuple(probe.shape[1:3])

    # -- tokens -------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        c, s = self.config.in_chans, self.config.img_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(
                f"encoder timm ({self.config.arch}) expects image batches (B, {c}, {s}, {s}), "
                f"got {tuple(x.shape)}; set model.in_chans / model.img_size to match the shards"
            )

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        if self.is_vit:
            return self.patch_embed(x) + self.pos_embed
        return self.tokens_2d(x).flatten(1, 2)

    def tokens_2d(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map as (B, rows, cols, C)."""
        features = self.backbone.forward_features(x)
        return features if self.channels_last else features.permute(0, 2, 3, 1)

    def encode(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_vit:  # token 0 is the pooled feature map: what probes and CLIP read
            return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = self.run_block(block, x, pad_mask)
        return self.norm(x)

    def token_grid(self) -> tuple[int, ...]:
        return self.grid

    def block_types(self) -> set[type[nn.Module]]:
        if self.is_vit:
            return super().block_types()
        stages = getattr(self.backbone, "stages", None) or getattr(self.backbone, "layers", ())
        return {type(stage) for stage in stages}  # ConvNeXt stages, Swin layers

    # -- MAE targets (ViT archs only) ---------------------------------------------------------

    @property
    def patch_dim(self) -> int:
        self._require_vit()
        return self.patch**2 * self.config.in_chans

    def _require_vit(self) -> None:
        if not self.is_vit:
            raise ValueError(
                f"timm arch {self.config.arch!r} is not a ViT: its tokens come out of the whole "
                "image, so they cannot be masked; use a ViT arch (e.g. vit_small_patch16_224) "
                "for MAE, or a contrastive objective with this one"
            )

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        self._require_vit()
        p, (gh, gw) = self.patch, self.grid
        b, c = x.shape[:2]
        x = x.reshape(b, c, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        self._require_vit()
        p, c, (gh, gw) = self.patch, self.config.in_chans, self.grid
        x = patches.reshape(-1, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, gh * p, gw * p)

    def timm_module(self) -> nn.Module:
        """The module whose parameter names are the timm model's own (checkpoint keys)."""
        return self if self.is_vit else self.backbone

    def describe(self) -> dict[str, Any]:
        # An export carries its own weights: rebuilding it must not need the original checkpoint.
        return {"name": self.name, "params": asdict(self.config) | {"pretrained": None},
                "kind": self.kind}  # fmt: skip


# -- pretrained weights -------------------------------------------------------------------------


def weights_file(source: str) -> Path:
    """The checkpoint file for a path (file, or folder with model.safetensors) or hf-hub ref."""
    if source.startswith(HF_HUB):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        repo = source.removeprefix(HF_HUB)
        # Read at call time: huggingface_hub reads these variables only once, at its import.
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        cache = os.environ.get("HF_HUB_CACHE") or None
        try:  # safetensors only: nothing from a hub is unpickled
            return Path(
                hf_hub_download(repo, WEIGHT_FILES[0], cache_dir=cache, local_files_only=offline)
            )
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise ConfigError(
                f"model.pretrained: {source}: cannot get {WEIGHT_FILES[0]} ({e})"
            ) from e
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise ConfigError(f"model.pretrained: {path.name}/ holds none of {WEIGHT_FILES}")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"model.pretrained: no such checkpoint {path.name!r}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a pickle-free torch checkpoint (`weights_only`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(
            f"model.pretrained: {path.name} is not a readable checkpoint ({e})"
        ) from e
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {path.name} holds no state dict of tensors")
    return dict(state)


def adapt_positions(state: dict, target: torch.Tensor, grid: tuple[int, int], notes: list) -> None:
    """Fold a class-token position slot into `cls_token`; interpolate the grid to `grid`."""
    src = state["pos_embed"]
    n = src.shape[1]
    prefix = next((p for p in (1, 0) if math.isqrt(n - p) ** 2 == n - p), None)
    if prefix is None:
        raise ConfigError(f"model.pretrained: pos_embed has {n} slots, not a square grid")
    if prefix and "cls_token" in state:
        state["cls_token"] = state["cls_token"] + src[:, :1]
        notes.append("cls_token: the checkpoint's class-token position slot folded into it")
    src, old = src[:, prefix:], math.isqrt(n - prefix)
    if (old, old) != grid:
        from timm.layers import resample_abs_pos_embed

        src = resample_abs_pos_embed(src, list(grid), [old, old], num_prefix_tokens=0)
        notes.append(f"pos_embed: interpolated from a {old}x{old} grid to {grid[0]}x{grid[1]}")
    state["pos_embed"] = src.to(target.dtype)


def load_pretrained(enc: TimmEncoder, source: str) -> dict[str, list[str]]:
    """Load `source` into the encoder; returns {missing, unexpected, adapted} key lists."""
    path = weights_file(source)
    state = read_state_dict(path)
    module = enc.timm_module()
    own = module.state_dict()
    notes: list[str] = []
    if enc.is_vit and "pos_embed" in state:
        adapt_positions(state, own["pos_embed"], enc.grid, notes)
    conv = state.get(enc.first_conv)
    if conv is not None and enc.first_conv in own and conv.shape[1] != own[enc.first_conv].shape[1]:
        from timm.models import adapt_input_conv

        state[enc.first_conv] = adapt_input_conv(enc.config.in_chans, conv)
        notes.append(f"{enc.first_conv}: {conv.shape[1]} input channels adapted to "
                     f"{enc.config.in_chans}")  # fmt: skip
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise ConfigError(
            f"model.pretrained: {path.name} does not fit arch {enc.config.arch!r}: "
            + "; ".join(wrong[:5])
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    result = module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = {
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(k for k in state if k not in own),
        "adapted": notes,
    }
    level = logging.WARNING if report["missing"] else logging.INFO
    log.log(level, "timm encoder %s from %s: %s", enc.config.arch, path.name, report)
    return report


@ENCODERS.register("timm", TimmConfig)
def timm_encoder(cfg: TimmConfig) -> TimmEncoder:
    return TimmEncoder(cfg)
