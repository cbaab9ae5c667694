"""Which modules of a model get an adapter: by name suffix, regex, or "all-linear"."""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import UniLoraError

try:  # transformers' GPT-2 style linear layer, weight stored as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but stay importable without it
    Conv1D = ()

# Output heads are excluded from "all-linear": they are trained in full (modules_to_save) or left alone.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler")


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return int(module.in_features), int(module.out_features)


def name_matches(name: str, targets) -> bool:
    """PEFT's rule: a regex string must match the whole name; list entries match as suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: linear module} in model order. A layer that already carries adapters counts as its
    base layer, under its own name; the inside of a saved head (modules_to_save) is never a target."""
    found, inside = {}, None  # named_modules walks depth first: a wrapper's modules follow it
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        if getattr(module, "is_saved_head", False):
            inside = name + "."
        elif getattr(module, "wraps_base_layer", False):
            inside = name + "."
            found[name] = module.base_layer
        elif is_adaptable(module):
            found[name] = module
    return found


def base_module(model: nn.Module, name: str) -> nn.Module:
    """The module at `name`, looking through an adapted layer to its base layer."""
    module = model.get_submodule(name)
    return module.base_layer if getattr(module, "wraps_base_layer", False) else module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the module at `name` (dotted, as named_modules gives it)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def is_torchao(weight: torch.Tensor) -> bool:
    return type(weight).__module__.startswith("torchao.")


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is stored quantized: a torchao tensor subclass, or a bitsandbytes parameter."""
    return is_torchao(weight) or getattr(weight, "quant_state", None) is not None \
        or getattr(weight, "SCB", None) is not None


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A torchao quantized weight dequantized (its own `dequantize`); any other weight as it is."""
    return weight.dequantize() if is_torchao(weight) else weight


def _weight_through_layer(module: nn.Module) -> torch.Tensor:
    """W (out × in) of a layer read through its own forward on the identity: bitsandbytes repacks its
    4-bit weights for its CPU kernels in place, so only the layer itself knows how to read them."""
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    with torch.no_grad():
        eye = torch.eye(module.in_features, dtype=dtype, device=module.weight.device)
        out = module(eye)
        if module.bias is not None:
            out = out - module.bias.to(out.dtype)
    return out.t().contiguous()


def base_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as out × in (a GPT-2 Conv1D keeps its own as in × out), dequantized
    when the base is quantized: what a method built from the base weights reads once at attach, and
    what merging adds to."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None:
        return _weight_through_layer(module)
    weight = dense_weight(weight)
    return weight.t() if is_conv1d(module) else weight


def base_weights(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The frozen weight (out × in) of each named layer, for a method built from them."""
    weights = [base_weight(base_module(model, name)) for name in names]
    if any(w.device.type == "meta" for w in weights):
        raise UniLoraError("this method builds its frozen factors from the base model's weights, and this model has "
                           "none (it lives on the meta device); load the model's weights first")
    return weights


def resolved_targets(model: nn.Module, names: list[str], exclude: list[str] = ()) -> list[str]:
    """What "all-linear" or a regex chose, as PEFT writes it: the module names' last parts, when
    they choose exactly the same layers again; else the full names."""
    suffixes = sorted({n.split(".")[-1] for n in names})
    return suffixes if find_targets(model, suffixes, exclude) == list(names) else list(names)


def find_targets(model: nn.Module, targets, exclude: list[str] = ()) -> list[str]:
    """Names of the linear modules to adapt, in model order."""
    linear = linear_modules(model)
    linear_names = list(linear)
    if targets == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [
            n
            for n in linear_names
            if linear[n] is not output and not any(p in n.split(".") for p in _HEAD_NAMES)
        ]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise UniLoraError(f"target_modules regex '{targets}' is invalid: {err}") from None
        chosen = [n for n in linear_names if name_matches(n, targets)]
        wrong_type = [n for n, m in model.named_modules()
                      if n and name_matches(n, targets) and n not in linear and not is_adaptable(m)]
        if wrong_type and not chosen:
            raise UniLoraError(
                f"target_modules {targets!r} matched {wrong_type[:3]}, which are not nn.Linear or Conv1D layers"
            )
    chosen = [n for n in chosen if not name_matches(n, list(exclude))] if exclude else chosen
    if not chosen:
        sample = sorted({n.split(".")[-1] for n in linear_names})[:12]
        raise UniLoraError(
            f"target_modules {targets!r} matched no linear layer; linear layer names end in {sample}"
        )
    return chosen
