"""MONAI's own 3D backbones behind the encoder registry, so MONAI checkpoints can start a run.

- `monai_swin3d`: the Swin transformer of `monai.networks.nets.SwinUNETR` (its `swinViT`,
  `SwinTransformer`). Its tokens are the last stage's feature map (stride 32, 16 x feature_size
  channels, SwinUNETR's bottleneck) and token 0 is their mean. Shifted windows have mixed the
  whole patch into every token, so MAE refuses it (as for timm's CNNs); contrastive objectives
  and fine-tuning use it.
- `monai_vit3d`: `monai.networks.nets.ViT` (UNETR's encoder): its patch embedding, transformer
  blocks and norm under MONAI's parameter names, plus a class token; MAE masks its tokens.

`pretrained` reads a local safetensors or torch checkpoint (`weights_only`, never unpickled
objects), or `hf-hub:ORG/NAME`, as the timm encoder does. Key layouts understood: the model's
own state dict; MONAI's published Swin SSL weights (`model_swinvit.pt`: `state_dict` with a
`module.` prefix and `mlp.fc1/fc2`, the mapping of `SwinUNETR.load_from`); a whole SwinUNETR or
UNETR state dict (`swinViT.` / `vit.` prefixes, decoders reported unexpected). Missing and
unexpected keys are logged and kept in `encoder.load_report`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from medfm.config import ConfigError

from .base import Encoder, patchify_3d, unpatchify_3d
from .registry import ENCODERS
from .timm2d import read_state_dict, weights_file

log = logging.getLogger(__name__)

SWIN_STRIDE = 32  # patch embedding (2) x four patch mergings: inputs are multiples of this
# Published Swin SSL names -> MONAI's module names (SwinUNETR.load_from's copies).
RENAMES = ((re.compile(r"\.mlp\.fc([12])\."), r".mlp.linear\1."),)
WRAPPERS = ("module.",)  # DataParallel / DDP prefixes of training checkpoints


@dataclass
class SwinConfig:
    img_size: tuple[int, int, int] = (96, 96, 96)  # the training patch, voxels
    in_chans: int = 1
    feature_size: int = 48  # 48: MONAI's published SSL weights
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    drop_path: float = 0.0
    use_v2: bool = False  # SwinUNETR-v2's residual convolution per stage
    pretrained: str | None = None  # checkpoint file or folder, or hf-hub:ORG/NAME


@dataclass
class MonaiViTConfig:
    img_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: tuple[int, int, int] = (16, 16, 16)
    in_chans: int = 1
    hidden_size: int = 768  # UNETR's ViT-B
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    qkv_bias: bool = False  # MONAI's default (its checkpoints have no qkv bias)
    pretrained: str | None = None


def check_multiple(name: str, size: tuple[int, ...], of: tuple[int, ...]) -> None:
    if any(s % p for s, p in zip(size, of, strict=True)):
        raise ConfigError(f"model.img_size {list(size)} is not a multiple of {list(of)} ({name})")


class MonaiEncoder(Encoder):
    """What both MONAI encoders share: the 3D input check and pretrained loading."""

    kind = "volume3d"
    prefixes: tuple[str, ...] = ()  # a checkpoint key may carry one of these before ours

    def check_input(self, x: torch.Tensor, kind: str | None) -> None:
        super().check_input(x, kind)
        want = (self.config.in_chans, *self.config.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"encoder {self.name} expects volume patches (B, {', '.join(map(str, want))}), "
                f"got {tuple(x.shape)}; set data.patch_size and model.img_size to the same size"
            )

    def load(self, source: str) -> dict[str, list[str]]:
        self.load_report = load_pretrained(self, source)
        return self.load_report

    def describe(self) -> dict[str, Any]:
        # An export carries its own weights: rebuilding it must not need the original checkpoint.
        return {"name": self.name, "params": asdict(self.config) | {"pretrained": None},
                "kind": self.kind}  # fmt: skip


class MonaiSwin3D(MonaiEncoder):
    prefixes = ("swinViT.",)

    def __init__(self, cfg: SwinConfig):
        super().__init__("monai_swin3d", cfg)
        check_multiple("the Swin stride", cfg.img_size, (SWIN_STRIDE,) * 3)
        # As SwinUNETR builds its swinViT, so that its parameter names are SwinUNETR's.
        self.swinViT = SwinTransformer(
            in_chans=cfg.in_chans,
            embed_dim=cfg.feature_size,
            window_size=(cfg.window_size,) * 3,
            patch_size=(2, 2, 2),
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            drop_path_rate=cfg.drop_path,
            spatial_dims=3,
            use_v2=cfg.use_v2,
        )
        self.blocks, self.norm = nn.ModuleList(), nn.Identity()  # the stages run in tokenize
        self.grid = tuple(s // SWIN_STRIDE for s in cfg.img_size)
        self.embed_dim = cfg.feature_size * 16
        self.num_tokens = math.prod(self.grid)
        self.load_report: dict[str, list[str]] = {}
        if cfg.pretrained:
            self.load(cfg.pretrained)

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        last = self.swinViT(x, normalize=True)[-1]  # (B, C, d, h, w): SwinUNETR's bottleneck
        return last.flatten(2).transpose(1, 2)

    def encode(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def token_grid(self) -> tuple[int, ...]:
        return self.grid

    def block_types(self) -> set[type[nn.Module]]:
        s = self.swinViT
        return {type(stage[0]) for stage in (s.layers1, s.layers2, s.layers3, s.layers4)}

    @property
    def patch_dim(self) -> int:
        raise self.not_maskable()

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        raise self.not_maskable()

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        raise self.not_maskable()

    def not_maskable(self) -> ConfigError:
        return ConfigError(
            "model: monai_swin3d tokens come out of the whole patch (shifted windows), so they "
            "cannot be masked (no MAE targets); use monai_vit3d or vit3d for MAE, or a "
            "contrastive objective (simclr) with this one"
        )


class MonaiViT3D(MonaiEncoder):
    prefixes = ("vit.",)

    def __init__(self, cfg: MonaiViTConfig):
        super().__init__("monai_vit3d", cfg)
        check_multiple("patch_size", cfg.img_size, cfg.patch_size)
        vit = ViT(
            in_channels=cfg.in_chans,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            spatial_dims=3,
        )
        # MONAI's names, so its checkpoints' keys are ours; the class token is our own (MONAI's
        # exists only with its classification head, and its position table skips it as ours).
        self.patch_embedding, self.blocks, self.norm = vit.patch_embedding, vit.blocks, vit.norm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_size, strict=True))
        self.embed_dim = cfg.hidden_size
        self.num_tokens = math.prod(self.grid)
        self.patch_dim = math.prod(cfg.patch_size) * cfg.in_chans
        self.load_report: dict[str, list[str]] = {}
        if cfg.pretrained:
            self.load(cfg.pretrained)

    def tokenize(self, x: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        return self.patch_embedding(x)  # adds MONAI's learnable position embedding

    def run_block(self, block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None):
        return block(x)  # volume patches are never padded

    def token_grid(self) -> tuple[int, ...]:
        return self.grid

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify_3d(x, self.grid, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify_3d(patches, self.grid, self.config.patch_size, self.config.in_chans)


# -- pretrained weights -------------------------------------------------------------------------


def our_key(key: str, own: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> str | None:
    """The encoder key a checkpoint key names, or None (a decoder's, an SSL head's)."""
    for wrapper in WRAPPERS:
        key = key.removeprefix(wrapper)
    for pattern, repl in RENAMES:
        key = pattern.sub(repl, key)
    for candidate in (key, *(p + key for p in prefixes), *(key.removeprefix(p) for p in prefixes)):
        if candidate in own:
            return candidate
    return None


def load_pretrained(enc: MonaiEncoder, source: str) -> dict[str, list[str]]:
    """Load `source` into the encoder; returns {missing, unexpected, adapted} key lists."""
    path = weights_file(source)
    state = read_state_dict(path)
    own = enc.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, renamed = [], 0
    for key, value in state.items():
        ours = our_key(key, own, enc.prefixes)
        if ours is None:
            unexpected.append(key)
            continue
        renamed += ours != key
        mapped[ours] = value
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
             for k, v in mapped.items() if v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise ConfigError(
            f"model.pretrained: {path.name} does not fit {enc.name} with these sizes: "
            + "; ".join(wrong[:5])
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    if not mapped:
        raise ConfigError(
            f"model.pretrained: {path.name} has no {enc.name} weights "
            f"(first keys: {sorted(state)[:3]})"
        )
    result = enc.load_state_dict(mapped, strict=False)
    report = {
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(unexpected),
        "adapted": [f"{renamed} keys renamed to MONAI's module names"] if renamed else [],
    }
    level = logging.WARNING if report["missing"] else logging.INFO
    log.log(level, "%s from %s: %s", enc.name, path.name, report)
    return report


@ENCODERS.register("monai_swin3d", SwinConfig)
def monai_swin3d(cfg: SwinConfig) -> MonaiSwin3D:
    return MonaiSwin3D(cfg)


@ENCODERS.register("monai_vit3d", MonaiViTConfig)
def monai_vit3d(cfg: MonaiViTConfig) -> MonaiViT3D:
    return MonaiViT3D(cfg)
