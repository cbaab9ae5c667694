"""Every method as a projection class, registered by name as its module is imported here: a new
method is one file plus one line below."""

from ..core.registry import PROJECTIONS

# each import registers its method, in the order the CLI and `unilora.METHODS` list them
# isort: off
from . import lora, vera, tied_lora, vblora, unilora, fastfood, lora_xs, tinylora  # noqa: F401
# isort: on
from .base import Projection, Recipe
from .factory import build_projection, recipe_config, recipe_of, refuse_without_weights

__all__ = ["PROJECTIONS", "Projection", "Recipe", "build_projection", "recipe_config", "recipe_of",
           "refuse_without_weights"]
