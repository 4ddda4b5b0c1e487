"""Objectives behind one registry. A hybrid is a list of objectives with weights in the config.

To add one: write a module here with a config dataclass and `@OBJECTIVES.register("name",
NameConfig)` on a factory `(config, ctx: Context) -> Objective`, and import it below (or declare
it with `OBJECTIVES.register_lazy` in base.py when its imports are slow, as diffusion's are; a
plug-in declares an entry point in the `medfm.objectives` group instead). docs/pretrain.md,
"Adding an objective".
"""

from . import contrastive, dino, mae, mcm  # noqa: F401  (registers the objectives)
from .base import OBJECTIVES, Context, Objective, gather_with_grad

__all__ = ["OBJECTIVES", "Context", "Objective", "gather_with_grad"]
