"""The encoder registry: `@ENCODERS.register(name, ConfigClass)` on a factory."""

from medfm.registry import Registry

ENCODERS = Registry("encoder", group="medfm.encoders")

# MONAI's Swin and ViT (monai3d.py) are imported on their first lookup, not with medfm.models.
ENCODERS.register_lazy("monai_swin3d", "medfm.models.monai3d")
ENCODERS.register_lazy("monai_vit3d", "medfm.models.monai3d")
