"""What merging added to a model's outputs, measured on one batch: each adapted layer's output on the
very inputs it saw before the merge (so one layer's error is not blamed on another's), and the
model's own output. On a quantized base this is the error of re-quantizing W + s·B A; on a plain
base, rounding alone."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..core.errors import UniLoraError

MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class MergeError:
    layer_max_abs: float  # the largest |merged - unmerged| of any adapted layer's output, on the same inputs
    layer_relative: float  # the largest of each layer's max |merged - unmerged| / max |unmerged|
    worst_layer: str  # the layer with that relative error
    output_max_abs: float  # the model's output (logits), merged against unmerged

    def line(self) -> str:
        return (f"merging changed the adapted layers' outputs by at most {self.layer_max_abs:.3g} (relative "
                f"{self.layer_relative:.3g}, at {self.worst_layer}) and the model's output by at most "
                f"{self.output_max_abs:.3g} on this batch")


def merge_dtype(to) -> torch.dtype | None:
    """A `to` of merge(): None (a quantized layer quantized again), a dtype, or its name."""
    if to is None or isinstance(to, torch.dtype):
        return to
    if to not in MERGE_DTYPES:
        raise UniLoraError(f"merge to '{to}': choose one of {', '.join(MERGE_DTYPES)} (or nothing: a quantized base "
                           "is quantized again)")
    return MERGE_DTYPES[to]


def _output(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result[0]


def _run(model: nn.Module, inputs) -> torch.Tensor:
    return _output(model(**inputs) if isinstance(inputs, dict) else model(inputs))


@torch.no_grad()
def measure_merge(model: nn.Module, layers: dict[str, nn.Module], inputs, merge: Callable[[], None]) -> MergeError:
    """Run `model` on `inputs` (a dict of keyword inputs or one tensor), call `merge` (which merges
    `layers`, by name), and compare."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(name):
        def record(module, args, output):
            seen[name] = (args[0].detach(), output.detach())
        return record

    was_training = model.training
    model.eval()  # dropout would make the two runs differ for no fault of the merge
    hooks = [layer.register_forward_hook(recorder(name)) for name, layer in layers.items()]
    try:
        before = _run(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    merge()
    worst, layer_max, relative = "", 0.0, 0.0
    for name, (x, y) in seen.items():
        diff = (layers[name](x).float() - y.float()).abs().max().item()
        scale = y.float().abs().max().item()
        layer_max = max(layer_max, diff)
        if scale > 0 and diff / scale >= relative:
            worst, relative = name, diff / scale
    after = _run(model, inputs)
    model.train(was_training)
    return MergeError(layer_max, relative, worst, (after.float() - before.float()).abs().max().item())
