"""Building a method's projection and its config by name: from the method's recipe, with the
settings it chooses from the layout, and with the base model's weights where the method needs them."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.layout import Layout
from ..core.registry import projection_class
from .base import Projection, Recipe


def recipe_of(method: str) -> Recipe:
    recipe = projection_class(method).recipe
    if recipe is None:
        raise UniLoraError(f"method '{method}' has no recipe (its Projection class sets none), so its settings and "
                           "learning rates cannot be left open: give them from Python (AdapterConfig, parameter_groups)")
    return recipe


def recipe_config(method: str, target_modules, *, modules_to_save=(), run_seed: int = 0, paper: bool = False,
                  tuned_model: bool = True, **fields) -> AdapterConfig:
    """The adapter config of `method`'s recipe (its tuned defaults, or with `paper` the papers'
    settings) with the `fields` that are not None put over it; the adapter's seed is its own field
    where given, else the run's (`run_seed`). Off the model the recipe was tuned on (`tuned_model`
    False), its model-specific choices (VB-LoRA's b) are left to the method."""
    seed = fields.pop("seed", None)
    recipe = recipe_of(method)
    if paper and recipe.paper is None:
        raise UniLoraError(f"method '{method}' records no paper settings; give its options (--rank, ...) yourself")
    options = dict(recipe.paper if paper else recipe.defaults)
    if not tuned_model:
        for key in recipe.model_specific:
            options.pop(key, None)
    options.update({key: value for key, value in fields.items() if value is not None})
    return AdapterConfig(method=method, target_modules=target_modules, modules_to_save=list(modules_to_save),
                         seed=run_seed if seed is None else seed, **options)


def refuse_without_weights(method: str, what: str) -> None:
    """One line for a tool that builds `method`'s projection without a model, where it needs one."""
    if projection_class(method).needs_base_weights:
        raise UniLoraError(f"the {method} adapter builds its frozen factors from the base model's weights, and {what} "
                           "works without the model; load the adapter onto its base model in Python instead")


def build_projection(config: AdapterConfig, layout: Layout,
                     base_weights: Callable[[], list[torch.Tensor]] | None = None) -> Projection:
    """The projection of `config` over `layout` (its open settings chosen from the layout). Where the
    method needs the base weights, `base_weights()` gives them (each slot's, out × in) to `attach`;
    without them such a projection is left unattached: it holds, counts and checks its stored
    tensors (inspect, count, a model on the meta device) but builds no factors."""
    cls = projection_class(config.method)
    projection = cls(layout, cls.resolve_config(config, layout))
    if cls.needs_base_weights and base_weights is not None:
        projection.attach(base_weights())
        projection.attached = True
    return projection
