"""Putting adapters into a model and taking them out, as free functions over the model's modules:
adapted layers in place of the target layers, saved heads in place of `modules_to_save`, and the
model's own modules back where no adapter uses them any more. AdaptedModel keeps the books."""

from __future__ import annotations

from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import LayoutMismatchError, UniLoraError
from ..core.layout import Layout
from ..core.targeting import is_adaptable, linear_shape, name_matches, replace_module
from .binder import FactorBinder
from .layers import AdaptedLayer, LayerAdapter, SavedHead
from .routing import AdapterRouter


def check_targets_exist(model: nn.Module, layout: Layout) -> None:
    """Refuse an adapter whose layers the model lacks, or has in another shape."""
    modules = dict(model.named_modules())
    for slot in layout.slots:
        module = modules.get(slot.name)
        if getattr(module, "wraps_base_layer", False):  # a layer that already carries other adapters
            module = module.base_layer
        if module is None or not is_adaptable(module):
            raise LayoutMismatchError(
                f"adapter does not fit this model: it adapts layer '{slot.name}', which this model "
                f"{'lacks' if module is None else 'has, but not as a linear layer'}; load it onto the base "
                "model architecture it was trained on"
            )
        if linear_shape(module) != (slot.in_features, slot.out_features):
            n_in, n_out = linear_shape(module)
            raise LayoutMismatchError(
                f"adapter does not fit this model: layer '{slot.name}' is {n_out}x{n_in} here but "
                f"{slot.out_features}x{slot.in_features} in the adapter; use the base model it was trained on"
            )


def inject_layers(model: nn.Module, names: list[str], router: AdapterRouter, adapter_name: str,
                  config: AdapterConfig, binder: FactorBinder) -> list[AdaptedLayer]:
    """Give each named layer adapter `adapter_name` (slot i for names[i]), wrapping it in an
    AdaptedLayer unless another adapter already did. Returns the layers in slot order."""
    layers = []
    for slot, name in enumerate(names):
        layer = model.get_submodule(name)
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer, router)
            replace_module(model, name, layer)
        layer.add(adapter_name, LayerAdapter(slot, config.scaling, config.dropout, binder))
        layers.append(layer)
    return layers


def wrap_heads(model: nn.Module, names: list[str], router: AdapterRouter, adapter_name: str) -> list[str]:
    """Give adapter `adapter_name` a trained copy of each module `names` match (outermost ones),
    wrapping it in a SavedHead unless another adapter already did. Returns their names."""
    if not names:
        return []
    found = [n for n, _ in model.named_modules()
             if n and name_matches(n, names) and ".original" not in n and ".copies." not in n]
    found = [n for n in found if not any(n.startswith(f + ".") for f in found)]  # outermost only
    if not found:
        raise UniLoraError(f"modules_to_save {names} matched no module of the model")
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLayer):
            raise UniLoraError(f"modules_to_save names '{name}', which another adapter adapts; train it in full "
                               "in a model of its own, or leave it out of modules_to_save")
        if not isinstance(module, SavedHead):
            module = SavedHead(module, router)
            replace_module(model, name, module)
        module.add(adapter_name)
    return found


def remove_adapter(model: nn.Module, adapter_name: str, layers: list[AdaptedLayer], layout: Layout,
                   head_modules: list[str]) -> None:
    """Take adapter `adapter_name` out of its layers and heads; a layer or head no adapter uses any
    more gets the model's own module back."""
    for layer, slot in zip(layers, layout.slots):
        layer.remove(adapter_name)
        if not layer.adapters:
            replace_module(model, slot.name, layer.base_layer)
    for name in head_modules:
        head = model.get_submodule(name)
        head.remove(adapter_name)
        if not len(head.copies):
            replace_module(model, name, head.original)


def unwrap(model: nn.Module, layers: list[AdaptedLayer], layout: Layout, head_modules: list[str], keep: str) -> None:
    """Put the model's own layers back, and in each head adapter `keep`'s trained copy (the original
    where it has none): what merge_and_unload leaves."""
    for layer, slot in zip(layers, layout.slots):
        replace_module(model, slot.name, layer.base_layer)
    for name in head_modules:
        head = model.get_submodule(name)
        if isinstance(head, SavedHead):
            replace_module(model, name, head.copies[keep] if keep in head.copies else head.original)
