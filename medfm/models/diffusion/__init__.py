"""Diffusion models apart from the trainer: the UNet and its noise schedule (`model`), the
intensity contract of the training data (`contract`), export and load as safetensors plus a
JSON sidecar (`export`), and fast sampling (`sampling`).

Import the submodules themselves: `contract` stays light, the others load diffusers (seconds),
so this package imports nothing on its own. None of them needs the Lightning engine; the
training objective over the model lives in `medfm.pretrain.objectives.diffusion`.
"""

__all__ = ["contract", "export", "model", "sampling"]
