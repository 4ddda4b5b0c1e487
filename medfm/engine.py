"""Engine settings every training stage shares (pretrain and fine-tuning run through Lightning
with the same choices)."""

from __future__ import annotations

from medfm.device import has_gpu

GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def precision_for(precision: str, accelerator: str) -> str:
    """`auto`: bf16 autocast on a GPU (the tensor cores' format, no loss scaling), full fp32 on
    the CPU (where bf16 matmuls are emulated and slower); any other value as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if has_gpu() and accelerator in GPU_ACCELERATORS else "32-true"
