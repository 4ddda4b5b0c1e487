"""Objectives behind one registry. A hybrid is a list of objectives with weights in the config.

To add one: write a module here with a config dataclass and `@OBJECTIVES.register("name",
NameConfig)` on a factory `(config, ctx: Context) -> Objective`. Modules named `diffusion*` are
imported the first time a name is not found (so diffusers loads only for diffusion runs);
others are imported below.
"""

from . import contrastive, mae, mcm  # noqa: F401  (registers the objectives)
from .base import OBJECTIVES, Context, Objective, gather_with_grad

__all__ = ["OBJECTIVES", "Context", "Objective", "gather_with_grad"]
