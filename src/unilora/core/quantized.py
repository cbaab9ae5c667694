"""One linear layer quantized: which quantization a layer holds, and how to quantize a plain one the
same way. The whole-model `--quantize` (models/quantization.py) and the merge that re-quantizes a
merged layer (engine/layers.py) both go through here, so a merged layer is stored exactly as the base
layer it replaces.

- int8: torchao's int8 weight-only (`Int8WeightOnlyConfig`), per-channel scales.
- int4: torchao's `IntxWeightOnlyConfig(int4, groups of 32)`, the CPU route (torchao 0.18's
  `Int4WeightOnlyConfig` asks for the CUDA `mslk` kernels); values unpacked into int8 storage.
- nf4, fp4: bitsandbytes' `Linear4bit` (packed 4-bit), compute in the layer's dtype.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .errors import UniLoraError
from .extras import require
from .targeting import base_weight, is_quantized, linear_modules, replace_module

QUANTIZATIONS = ("int8", "int4", "nf4", "fp4")
INT4_GROUP = 32


@contextlib.contextmanager
def quiet_quantization_logs():
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


def layer_quantization(module: nn.Module) -> str | None:
    """What a linear layer's weight is quantized as ("int8", "int4", "nf4", "fp4", or the weight's
    type for others), None when it is not."""
    weight = module.weight
    if not is_quantized(weight):
        return None
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return getattr(state, "quant_type", None) or "bnb-4bit"
    name = type(weight).__name__
    if name == "Int8Tensor":
        return "int8"
    if name == "IntxUnpackedToInt8Tensor" and getattr(weight, "target_dtype", None) == torch.int4:
        return "int4"
    return name


def torchao_config(kind: str):
    """torchao's quantization config for "int8" or "int4" (the quant extra must be installed)."""
    require("quant", f"--quantize {kind}", ("torchao",))
    with quiet_quantization_logs():
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    if kind == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """`linear` quantized as `kind`: the same layer object with a torchao weight (int8, int4), or a new
    bitsandbytes `Linear4bit` (nf4, fp4) holding its weight and bias."""
    if kind not in QUANTIZATIONS:
        raise UniLoraError(f"unknown quantization '{kind}'; choose one of {', '.join(QUANTIZATIONS)}")
    if kind in ("int8", "int4"):
        config = torchao_config(kind)
        with quiet_quantization_logs():
            from torchao.quantization import quantize_
        quantize_(linear, config, filter_fn=lambda module, name: module is linear)
        return linear
    require("quant", f"--quantize {kind}", ("bitsandbytes",))
    with quiet_quantization_logs():
        import bitsandbytes as bnb
    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=linear.weight.dtype, quant_type=kind, device=linear.weight.device)
    new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=kind)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new.to(linear.weight.device)


@torch.no_grad()
def dense_linear(module: nn.Module, dtype: torch.dtype | None = None, add: torch.Tensor | None = None) -> nn.Linear:
    """A quantized linear layer as a plain frozen `nn.Linear` of `dtype` (default: the dtype it
    computes in) holding its dequantized weight (plus `add`, summed in fp32, rounded once) and its bias."""
    weight = base_weight(module)
    dtype = dtype or getattr(module, "compute_dtype", None) or weight.dtype
    if add is not None:
        weight = weight.float() + add.to(weight.device)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device, dtype=dtype)
    dense.weight.copy_(weight)
    if module.bias is not None:
        dense.bias.copy_(module.bias)
    return dense.requires_grad_(False)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype`, every quantized linear layer replaced by its plain `dense_linear` (in place)."""
    for name, module in linear_modules(model).items():
        if is_quantized(module.weight):
            replace_module(model, name, dense_linear(module, dtype))
    return model.to(dtype)
