"""The fine-tuned model: base encoder (frozen, LoRA-adapted or fully trained) plus a task head."""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from medfm.config import ConfigError
from medfm.models import Encoder

from .config import LoraConfig
from .heads import LinearHead, UNETRDecoder, encoder_hidden_states, head_outputs


def lora_target_regex(targets: list[str]) -> str:
    """Match the named linear layers inside every transformer block (fused qkv included)."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?blocks\.\d+\.({alternatives})"


def apply_lora(encoder: Encoder, cfg: LoraConfig, base_id: str) -> PeftModel:
    """Wrap the encoder in PEFT LoRA; base weights stay frozen, only A/B matrices train."""
    config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_regex(cfg.targets),
        base_model_name_or_path=base_id,
    )
    encoder.name_or_path = base_id  # PEFT records this as the adapter's base model
    return get_peft_model(encoder, config)


def build_head(encoder: Encoder, task_type: str, label_names: list[str]) -> nn.Module:
    """The task's head: linear on the pooled embedding, or a UNETR decoder."""
    if task_type != "segmentation":
        return LinearHead(encoder.embed_dim, head_outputs(task_type, len(label_names)))
    ec = encoder.config
    patch = ec.patch_size
    sizes = set(patch) if isinstance(patch, (tuple, list)) else {patch}
    if len(sizes) != 1:
        raise ConfigError(f"segmentation head: needs an isotropic encoder patch size, got {patch}")
    img = ec.img_size if isinstance(ec.img_size, (tuple, list)) else (ec.img_size, ec.img_size)
    p = sizes.pop()
    return UNETRDecoder(
        spatial_dims=len(img),
        in_chans=ec.in_chans,
        embed_dim=encoder.embed_dim,
        grid=tuple(s // p for s in img),
        patch_size=p,
        out_channels=len(label_names),
    )


class FinetuneModel(nn.Module):
    """encoder + head; `forward` maps preprocessed inputs to logits (or regression values)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, task_type: str, pool: str = "mean"):
        super().__init__()
        self.encoder, self.head, self.task_type, self.pool = encoder, head, task_type, pool

    def base_encoder(self) -> Encoder:
        return (
            self.encoder.get_base_model() if isinstance(self.encoder, PeftModel) else self.encoder
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task_type == "segmentation":
            enc = self.base_encoder()
            hidden = encoder_hidden_states(enc, x, self.head.hidden_indices(len(enc.blocks)))
            return self.head(x, hidden)
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """One embedding per sample: mean of the patch tokens (as MAE fine-tunes), or the
        class token."""
        tokens = self.base_encoder()(x)
        return tokens[:, 1:].mean(1) if self.pool == "mean" else tokens[:, 0]


def param_groups(
    model: FinetuneModel, mode: str, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Head at `lr`; full fine-tuning adds encoder layers at lr * decay^(depth + 1 - layer)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}

    def add(p: nn.Parameter, scale: float) -> None:
        wd = 0.0 if p.ndim <= 1 else weight_decay  # no decay on norms, biases, tokens
        groups.setdefault((scale, wd), []).append(p)

    for p in model.head.parameters():
        add(p, 1.0)
    enc = model.base_encoder()
    depth = len(enc.blocks)
    for name, p in enc.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 if mode == "lora" else layer_decay ** (depth + 1 - enc.layer_id(name))
        add(p, scale)
    return [
        {"params": ps, "lr": lr * s, "lr_scale": s, "weight_decay": wd}
        for (s, wd), ps in groups.items()
    ]
