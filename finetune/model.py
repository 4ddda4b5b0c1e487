"""The fine-tuned model: base encoder (frozen, LoRA-adapted or fully trained) plus the head its
task built (`Task.build_head`); the task also says how inputs reach the head."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from medfm.models import Encoder

if TYPE_CHECKING:
    from .config import LoraConfig
    from .tasks import Task


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


class FinetuneModel(nn.Module):
    """encoder + head; `forward` maps preprocessed inputs to logits (or regression values)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, task: Task):
        super().__init__()
        self.encoder, self.head, self.task = encoder, head, task

    def base_encoder(self) -> Encoder:
        return (
            self.encoder.get_base_model() if isinstance(self.encoder, PeftModel) else self.encoder
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """One embedding per sample: mean of the patch tokens (as MAE fine-tunes), or the
        class token."""
        tokens = self.base_encoder()(x)
        return tokens[:, 1:].mean(1) if self.task.cfg.pool == "mean" else tokens[:, 0]


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
