"""Quantized base models (`--quantize`): a causal LM's linear layers stored in 8 or 4 bits, the
adapters beside them in the compute dtype (QLoRA's setup).

What each kind is, and how one layer is quantized: core/quantized.py.

The output head (`lm_head`, tied to the embeddings in small models) stays as it is, as PEFT and
QLoRA leave it. A model's quantization is found from its weights (`quantization_of`), so an adapter
records what it was trained on whoever quantized the model.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import UniLoraError
from ..core.quantized import QUANTIZATIONS, layer_quantization, quantize_linear, quiet_quantization_logs, torchao_config
from ..core.targeting import linear_modules, replace_module


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers to quantize: all but the output head (and any other head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in linear_modules(model).items() if m is not head and isinstance(m, nn.Linear)}


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Quantize `model`'s linear layers (not its output head) in place, as `kind` says."""
    if kind not in QUANTIZATIONS:
        raise UniLoraError(f"unknown quantization '{kind}'; choose one of {', '.join(QUANTIZATIONS)}")
    targets = _targets(model)
    if kind in ("int8", "int4"):  # one pass of torchao over the model
        config = torchao_config(kind)
        with quiet_quantization_logs():
            from torchao.quantization import quantize_
        chosen = set(targets.values())
        quantize_(model, config, filter_fn=lambda module, name: module in chosen)
        return model
    for name, linear in targets.items():
        replace_module(model, name, quantize_linear(linear, kind))
    return model


def quantization_of(model: nn.Module) -> str | None:
    """What a model's linear layers are quantized as ("int8", "int4", "nf4", "fp4", or the weight's
    type for others), None when none is."""
    for module in linear_modules(model).values():
        kind = layer_quantization(module)
        if kind is not None:
            return kind
    return None


def check_quantization(kind: str | None) -> str | None:
    """A --quantize value: one of QUANTIZATIONS, or "none" / None for the model as it is stored."""
    if kind in (None, "none"):
        return None
    if kind not in QUANTIZATIONS:
        raise UniLoraError(f"--quantize {kind}: choose one of {', '.join(QUANTIZATIONS)} or none")
    return kind


def quantization_note(recorded: str | None, used: str | None) -> str | None:
    """One note when an adapter runs on a base quantized otherwise than the one it was trained on."""
    if recorded == used:
        return None
    return (f"the adapter was trained on a base {f'quantized as {recorded}' if recorded else 'not quantized'}; it runs "
            f"here on one {f'quantized as {used}' if used else 'not quantized'} (the same adapter numbers, other base "
            "weights: expect slightly different outputs)")
