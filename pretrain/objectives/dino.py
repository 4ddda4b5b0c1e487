"""DINOv2-style self-distillation (Oquab et al., TMLR 2024) for 2D and 3D ViTs: DINO's image-level
loss over multi-crop views, iBOT's masked-patch loss and the KoLeo regulariser.

- Views: 2 global crops at the encoder's size (area 0.32-1) and `local_crops` crops of
  `local_size` px (area 0.05-0.32), each with a horizontal flip, drawn from the step seed with
  torchvision's RandomResizedCrop rule on the batch (augment.resized_crop_flip), so a resumed run
  sees the same views. Local crops get the position table interpolated to their grid, as DINOv2.
- 3D (vit3d, monai_vit3d): the same on volume patches, as in 3D self-distillation work (e.g.
  Swin-UNETR's and 3D DINO adaptations): global crops of the patch (a volume fraction in
  global_scale, resized to the patch), `local_crops` crops resized to `local_size` voxels (an int
  for a cube, or one size per axis for anisotropic patches), flips along every axis, trilinear
  resampling (augment.resized_crop_flip_3d) and a trilinearly interpolated position table.
- Teacher: an EMA of the student encoder and head, momentum on a cosine from `momentum` to
  `momentum_end` over `schedule_steps`. The objective does not see the optimizer, so the teacher
  takes its EMA step at the first micro-batch after the student's weights changed (their
  version counters moved): once per optimizer step, also under gradient accumulation. The
  step of the last optimizer step is therefore taken by the next run that resumes it, not at
  export: the exported teacher trails the student's final step by one EMA update.
- Targets: teacher logits are centred (an EMA of their batch mean, `center_momentum`, all-reduced
  across ranks) and sharpened with a temperature that warms up linearly from
  `teacher_temp_start` to `teacher_temp` over `teacher_temp_warmup_steps`; the student's
  temperature is `student_temp`. DINOv2's Sinkhorn-Knopp centering is not implemented.
- iBOT: a `mask_probability` share of the global views get a random `mask_ratio` range of their
  patch tokens replaced by a learned mask token (random patches, not DINOv2's block masks); the
  student's masked patch tokens are trained toward the teacher's on the full view, through the
  same head (DINOv2's default, `ibot.separate_head: false`) with its own center.
- KoLeo (Sablayrolles et al. 2019) on the student's class tokens of each global view spreads the
  features over the sphere (DINOv2 weight 0.1).

DINOv2 also schedules weight decay (0.04 -> 0.4) and freezes the prototypes for the first epoch;
the engine keeps weight decay constant and this objective does not freeze them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock
from timm.layers import resample_abs_pos_embed
from torch import nn

from medfm.config import ConfigError

from .augment import resized_crop_flip, resized_crop_flip_3d
from .base import OBJECTIVES, Context, Objective


@dataclass
class DINOConfig:
    prototypes: int = 65536  # DINOv2 head_n_prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_crops: int = 8  # DINOv2's default; DINO's ViT-B used 10
    local_scale: tuple[float, float] = (0.05, 0.32)
    local_size: int | tuple[int, ...] = 96  # px (2D) or voxels (3D): an int, or one per axis
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 0  # 0: teacher_temp from the first step
    center_momentum: float = 0.9
    momentum: float = 0.992
    momentum_end: float = 1.0
    schedule_steps: int = 1000  # horizon of the momentum cosine: set it to train.max_steps
    ibot_weight: float = 1.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    koleo_weight: float = 0.1


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2-normalised, scored against unit-norm prototypes (DINO's head with
    its weight-normalised last layer at norm 1)."""

    def __init__(self, dim: int, cfg: DINOConfig):
        super().__init__()
        widths = [dim] + [cfg.hidden_dim] * (cfg.head_layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(widths) - 2 else [])
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(cfg.prototypes, cfg.bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean log distance of each feature to its nearest neighbour on the unit sphere."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


def monai_embedding(enc: nn.Module) -> PatchEmbeddingBlock | None:
    """The MONAI patch embedding of a 3D ViT (vit3d's patch_embed, monai_vit3d's
    patch_embedding): conv projection, then its learnable position table."""
    for name in ("patch_embed", "patch_embedding"):
        block = getattr(enc, name, None)
        if isinstance(block, PatchEmbeddingBlock) and block.proj_type == "conv":
            return block
    return None


def position_table(enc: nn.Module) -> torch.Tensor:
    """(1, tokens, D): the absolute positions added to the encoder's patch tokens."""
    block = monai_embedding(enc)
    return enc.pos_embed if block is None else block.position_embeddings


def patch_shape(enc: nn.Module) -> tuple[int, ...]:
    """The encoder's patch size, one entry per spatial axis."""
    if monai_embedding(enc) is not None:
        return tuple(enc.config.patch_size)
    return tuple(enc.patch_embed.patch_size)


def view_shape(enc: nn.Module) -> tuple[int, ...]:
    """The input size the encoder is built for: the global views' size."""
    size = enc.config.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


def local_shape(cfg: DINOConfig, enc: nn.Module) -> tuple[int, ...]:
    axes = len(view_shape(enc))
    return (cfg.local_size,) * axes if isinstance(cfg.local_size, int) else tuple(cfg.local_size)


def tokens_at(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens of a crop of any size: the position table interpolated to its grid."""
    if tuple(x.shape[2:]) == view_shape(enc):
        return enc.tokenize(x)
    block = monai_embedding(enc)
    if block is not None:  # MONAI's PatchEmbeddingBlock.forward, at another grid
        t = block.patch_embeddings(x)
        table = block.position_embeddings.transpose(1, 2).reshape(1, -1, *enc.token_grid())
        pos = F.interpolate(table, size=t.shape[2:], mode="trilinear", align_corners=False)
        return block.dropout(t.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2))
    pe = enc.patch_embed
    t = pe.proj(x)
    grid = list(t.shape[-2:])
    t = pe.norm(t.flatten(2).transpose(1, 2))
    pos = resample_abs_pos_embed(enc.pos_embed, grid, list(enc.token_grid()), num_prefix_tokens=0)
    return t + pos


def cross_entropy(teacher: torch.Tensor, student_logits: torch.Tensor, temp: float):
    """Per-row -sum p_teacher log softmax(student / temp)."""
    return -(teacher * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(-1)


MASK_SEED = 0x1B07_5EED  # the iBOT masks' generator: the step seed xor this, apart from the views'


@dataclass
class Masks:
    """iBOT masks of the global views, drawn on the host (see DINO.masks)."""

    grid: torch.Tensor  # (n, tokens) bool, True = masked
    picked: torch.Tensor  # the masked tokens' flat indices in (n * tokens), row-major
    weight: torch.Tensor  # per masked token: 1 / the masked count of its image
    images: int  # images with at least one masked token

    def select(self, out: torch.Tensor) -> torch.Tensor:
        """The masked patch tokens of encoder output (n, 1 + tokens, D), in `picked` order (an
        index_select: a boolean index would read its size back from the device)."""
        return out[:, 1:].flatten(0, 1).index_select(0, self.picked)


class DINO(Objective):
    kinds = ("image2d", "volume3d")

    def __init__(self, cfg: DINOConfig, ctx: Context):
        super().__init__("dino", cfg, ctx)
        enc = ctx.encoder
        check(cfg, enc)
        self.head = DINOHead(enc.embed_dim, cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.teacher = nn.ModuleDict(
            {"encoder": copy.deepcopy(enc), "head": copy.deepcopy(self.head)}
        )
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.prototypes))
        self.register_buffer("patch_center", torch.zeros(1, cfg.prototypes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # teacher EMA steps
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self._seen_version: int | None = None

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no stochastic depth or dropout in the teacher
        return self

    # -- schedules and the teacher ------------------------------------------------------------

    # The schedules are tensors computed from the step buffer where it lives: reading the step
    # back to the host would stall a GPU every step.

    def momentum_now(self) -> torch.Tensor:
        cfg = self.config
        progress = (self.step.float() / max(1, cfg.schedule_steps)).clamp(max=1.0)
        return (
            cfg.momentum_end
            - (cfg.momentum_end - cfg.momentum) * (1 + torch.cos(math.pi * progress)) / 2
        )

    def teacher_temp_now(self) -> torch.Tensor:
        cfg = self.config
        warmup = cfg.teacher_temp_warmup_steps
        if not warmup:
            return self.step.new_tensor(cfg.teacher_temp, dtype=torch.float)
        f = (self.step.float() / warmup).clamp(max=1.0)
        return cfg.teacher_temp_start + f * (cfg.teacher_temp - cfg.teacher_temp_start)

    def student_params(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.head.parameters()]

    def teacher_params(self) -> list[nn.Parameter]:
        return [*self.teacher["encoder"].parameters(), *self.teacher["head"].parameters()]

    @torch.no_grad()
    def follow_student(self) -> None:
        """One EMA step of the teacher when the student moved since the last one (see above)."""
        version = sum(p._version for p in self.student_params())
        # A resumed run: the checkpoint was written after an optimizer step the teacher has not
        # followed yet (its update is due at the next micro-batch).
        moved = (
            version != self._seen_version if self._seen_version is not None else bool(self.started)
        )
        if moved:  # teacher <- m teacher + (1 - m) student
            torch._foreach_lerp_(self.teacher_params(), self.student_params(),
                                 1 - self.momentum_now())  # fmt: skip
            self.step += 1
        self._seen_version = version
        self.started.fill_(True)

    @torch.no_grad()
    def update_center(self, center: torch.Tensor, logits: torch.Tensor) -> None:
        """EMA of the batch mean over every rank; no rows on any rank (iBOT off) leaves it."""
        mean = logits.float().sum(0, keepdim=True)
        count = torch.tensor(float(len(logits)), device=logits.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            dist.all_reduce(count)
        weight = (1 - self.config.center_momentum) * (count > 0)
        center.lerp_(mean / count.clamp(min=1), weight)

    # -- views and masks ----------------------------------------------------------------------

    def views(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, list]:
        """(2B global crops stacked view by view, the local crops one batch per view)."""
        cfg = self.config
        crop = resized_crop_flip_3d if x.ndim == 5 else resized_crop_flip
        size = local_shape(cfg, self.encoder)
        g = [crop(x, gen, tuple(cfg.global_scale)) for _ in range(2)]
        loc = [crop(x, gen, tuple(cfg.local_scale), size=size) for _ in range(cfg.local_crops)]
        return torch.cat(g), loc

    def masks(self, n: int, tokens: int, seed: int, device) -> Masks:
        """A mask_probability share of the n rows (at least one), each with a ratio drawn
        uniformly from mask_ratio of its tokens masked. Drawn on the host from their own seed:
        the masked-token count is then known without reading the device back."""
        cfg = self.config
        mask = torch.zeros(n, tokens, dtype=torch.bool)
        if cfg.ibot_weight and cfg.mask_probability:
            gen = torch.Generator().manual_seed(seed ^ MASK_SEED)
            rows = torch.randperm(n, generator=gen)[: max(1, round(n * cfg.mask_probability))]
            lo, hi = cfg.mask_ratio
            ratio = lo + (hi - lo) * torch.rand(len(rows), generator=gen)
            count = (ratio * tokens).round().clamp(min=1)
            rank = torch.rand(len(rows), tokens, generator=gen).argsort(1).argsort(1)
            mask[rows] = rank < count[:, None]
        picked = mask.flatten().nonzero().squeeze(1)
        weight = (1 / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(mask).flatten()[picked]
        return Masks(*(t.to(device, non_blocking=True) for t in (mask, picked, weight)),
                     images=int(mask.any(1).sum()))  # fmt: skip

    # -- the loss -----------------------------------------------------------------------------

    def student(self, glob: torch.Tensor, loc: list, masks: Masks):
        """Class tokens of every view (global ones masked) and the masked patch tokens."""
        enc = self.encoder
        tokens = enc.tokenize(glob)
        masked = self.mask_token + position_table(enc)
        out = enc.encode(torch.where(masks.grid[..., None], masked, tokens))
        cls = [out[:, 0]]
        if loc:  # all local crops in one pass
            cls.append(enc.encode(tokens_at(enc, torch.cat(loc)))[:, 0])
        return out[:, 0], self.head(torch.cat(cls)), self.head(masks.select(out))

    @torch.no_grad()
    def teacher_logits(self, glob: torch.Tensor, masks: Masks):
        """The teacher's class-token and masked-patch logits on the full global views."""
        enc, head = self.teacher["encoder"], self.teacher["head"]
        out = enc.encode(enc.tokenize(glob))
        return head(out[:, 0]).float(), head(masks.select(out)).float()

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.training:
            self.follow_student()
        cfg, x = self.config, batch["data"]
        gen = self._ctx.generator(x.device)
        glob, loc = self.views(x, gen)
        masks = self.masks(len(glob), self.encoder.num_tokens, self._ctx.seed, x.device)
        features, s_cls, s_patch = self.student(glob, loc, masks)
        t_cls, t_patch = self.teacher_logits(glob, masks)
        temp = self.teacher_temp_now()
        dino = self.dino_loss(F.softmax((t_cls - self.center) / temp, dim=-1), s_cls, len(x))
        ibot = self.ibot_loss(
            F.softmax((t_patch - self.patch_center) / temp, dim=-1), s_patch, masks
        )
        reg = sum(koleo(f) for f in features.chunk(2)) if cfg.koleo_weight else dino * 0
        if self.training:
            self.update_center(self.center, t_cls)
            self.update_center(self.patch_center, t_patch)  # every rank: all_reduce inside
        parts = {"dino": dino, "ibot": ibot, "koleo": reg}
        schedules = {"teacher_temp": temp, "momentum": self.momentum_now()}
        return {
            "loss": dino + cfg.ibot_weight * ibot + cfg.koleo_weight * reg,
            **{k: v.detach() for k, v in parts.items()},
            **{k: v.detach() for k, v in schedules.items()},
        }

    def dino_loss(self, teacher: torch.Tensor, student: torch.Tensor, n: int) -> torch.Tensor:
        """Mean over (teacher global view, student view of another crop) pairs."""
        t_views, s_views = teacher.chunk(2), student.split(n)
        total, pairs = 0.0, 0
        for i, t in enumerate(t_views):
            for j, s in enumerate(s_views):
                if i != j:
                    total = total + cross_entropy(t, s, self.config.student_temp).mean()
                    pairs += 1
        return total / pairs

    def ibot_loss(self, teacher: torch.Tensor, student: torch.Tensor, masks: Masks):
        """Per masked image the mean over its masked tokens, then the mean over those images
        (0, still connected to the graph, when nothing is masked)."""
        per_token = cross_entropy(teacher, student, self.config.student_temp)
        return (per_token * masks.weight).sum() / max(1, masks.images)

    def flops_per_sample(self) -> float:
        cfg, enc = self.config, self.encoder
        g = enc.num_tokens + 1
        grid = (s // p for s, p in zip(local_shape(cfg, enc), patch_shape(enc), strict=True))
        n_local = math.prod(grid) + 1
        student = (
            2 * enc.flops_per_token(g) * g
            + cfg.local_crops * enc.flops_per_token(n_local) * n_local
        )
        head = sum(p.numel() for p in self.head.parameters())
        return (
            student
            + 2 * enc.flops_per_token(g) * g / 3
            + 6.0 * head * (2 + cfg.local_crops)
            + 4.0 * head
        )

    def export_modules(self) -> dict[str, nn.Module]:
        """The teacher encoder (DINO evaluates the teacher), beside the exported student."""
        return {"teacher": self.teacher["encoder"]}


def check(cfg: DINOConfig, enc: nn.Module) -> None:
    has_table = monai_embedding(enc) is not None or (
        hasattr(enc, "patch_embed") and hasattr(enc, "pos_embed")
    )
    if not has_table:
        raise ConfigError(
            f"objective dino: the encoder {enc.name!r} has no patch embedding with a position "
            "table (local crops and masked patches need a ViT: vit2d, a timm ViT arch, vit3d "
            "or monai_vit3d)"
        )
    patch, full = patch_shape(enc), view_shape(enc)
    local = local_shape(cfg, enc)
    fits = len(local) == len(full) and all(
        s % p == 0 and p <= s <= f for s, p, f in zip(local, patch, full, strict=False)
    )
    if cfg.local_crops and not fits:
        raise ConfigError(
            f"objectives.dino.local_size: {cfg.local_size} must be a multiple of the patch size "
            f"{patch} and at most the image size {full}, one size or one per axis"
        )
    for key in ("global_scale", "local_scale", "mask_ratio"):
        lo, hi = getattr(cfg, key)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"objectives.dino.{key} must satisfy 0 < low <= high <= 1, got {lo}, {hi}"
            )
    if cfg.head_layers < 1 or cfg.prototypes < 1:
        raise ConfigError("objectives.dino: head_layers and prototypes must be >= 1")


@OBJECTIVES.register("dino", DINOConfig)
def dino(cfg: DINOConfig, ctx: Context) -> DINO:
    return DINO(cfg, ctx)
