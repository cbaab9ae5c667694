"""Quantized base models (`--quantize`): a causal LM's linear layers stored in 8 or 4 bits, the
adapters beside them in the compute dtype (QLoRA's setup).

- int8: torchao's int8 weight-only (`Int8WeightOnlyConfig`), per-channel scales: a quarter of fp32's
  weight bytes.
- int4: torchao's int4 weight-only on CPU. `Int4WeightOnlyConfig` asks for the `mslk` kernels
  (CUDA) in torchao 0.18, so the CPU route is `IntxWeightOnlyConfig(int4, groups of 32)`, whose
  values are unpacked into int8 storage: int4's accuracy with int8's bytes on CPU.
- nf4, fp4: bitsandbytes' `Linear4bit` (packed 4-bit, its CPU backend), the layers' compute in fp32.

The output head (`lm_head`, tied to the embeddings in small models) stays as it is, as PEFT and
QLoRA leave it. A model's quantization is found from its weights (`quantization_of`), so an adapter
records what it was trained on whoever quantized the model.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..core.errors import UniLoraError
from ..core.extras import require
from ..core.targeting import is_quantized, linear_modules

QUANTIZATIONS = ("int8", "int4", "nf4", "fp4")
INT4_GROUP = 32


@contextlib.contextmanager
def _quiet():
    """torchao logs a line per optional kernel library it cannot load on this machine (CUDA ones on a CPU
    build) and torch warns about its pytree registrations: noise around our one line."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers to quantize: all but the output head (and any other head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in linear_modules(model).items() if m is not head and isinstance(m, nn.Linear)}


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Quantize `model`'s linear layers (not its output head) in place, as `kind` says."""
    if kind not in QUANTIZATIONS:
        raise UniLoraError(f"unknown quantization '{kind}'; choose one of {', '.join(QUANTIZATIONS)}")
    if kind in ("int8", "int4"):
        require("quant", f"--quantize {kind}", ("torchao",))
        with _quiet():
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerGroup
        config = Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
        targets = set(_targets(model).values())
        quantize_(model, config, filter_fn=lambda module, name: module in targets)
        return model
    require("quant", f"--quantize {kind}", ("bitsandbytes",))
    with _quiet():
        import bitsandbytes as bnb
    for name, linear in _targets(model).items():
        parent, _, child = name.rpartition(".")
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=linear.weight.dtype, quant_type=kind, device=linear.weight.device)
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=kind)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, new.to(linear.weight.device))
    return model


def quantization_of(model: nn.Module) -> str | None:
    """What a model's linear layers are quantized as ("int8", "int4", "nf4", "fp4", or the weight's
    type for others), None when none is."""
    for module in linear_modules(model).values():
        weight = module.weight
        if not is_quantized(weight):
            continue
        state = getattr(weight, "quant_state", None)
        if state is not None:
            return getattr(state, "quant_type", None) or "bnb-4bit"
        name = type(weight).__name__
        if name == "Int8Tensor":
            return "int8"
        if name == "IntxUnpackedToInt8Tensor" and getattr(weight, "target_dtype", None) == torch.int4:
            return "int4"
        return name
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
