"""The adapted layer (the frozen base layer plus s · B (A dropout(x)), never forming ΔW) and the
saved head (a trained copy beside the untouched original, as PEFT's modules_to_save)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .binder import FactorBinder
from .methods.base import ScaledFactors
from .targeting import is_conv1d

_EXACT_DTYPES = (torch.float32, torch.float64)


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, slot: int, scaling: float, dropout: float, binder: FactorBinder):
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Not a submodule: the binder (and the projection it holds) belongs to the model wrapper.
        object.__setattr__(self, "_binder", binder)

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects `layer.weight` keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not self._binder.enabled:
            return result
        factors = self._binder.factors(self.slot)
        x = self.dropout(x)
        if isinstance(factors, ScaledFactors):  # scale activations; the frozen matrices get no weight gradient
            a, d, bt, b = (t.to(x.dtype) for t in factors)
            return result + torch.matmul(F.linear(x, a) * d, bt) * (b * self.scaling)
        a, bt = factors
        if not torch.is_grad_enabled() and a.dtype == x.dtype == result.dtype and result.is_contiguous():
            # inference (generation: hundreds of tiny calls per token): one fused multiply-add into
            # the fresh base output instead of a matmul, a scale and an add
            flat = result.view(-1, result.shape[-1])
            flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]), a), bt, alpha=self.scaling)
            return result
        return result + torch.matmul(F.linear(x, a.to(x.dtype)), bt.to(x.dtype)) * self.scaling

    # --- merging --------------------------------------------------------------------
    def delta_weight(self, factors) -> torch.Tensor:
        """s · B A in the base weight's own layout ((in, out) for Conv1D), in fp32."""
        a, bt = factors.dense() if isinstance(factors, ScaledFactors) else factors
        delta = (bt.t().float() @ a.float()) * self.scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self, factors) -> None:
        """W += s·B A, added in fp32 and rounded once to the weight's dtype."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight(factors).to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, factors) -> bool:
        """W -= s·B A. Returns False when the weight's dtype cannot restore W exactly."""
        if not self.merged:
            return True
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(factors).to(weight.device)).to(weight.dtype))
        self.merged = False
        return weight.dtype in _EXACT_DTYPES

    def extra_repr(self) -> str:
        return f"slot={self.slot}, scaling={self.scaling}, merged={self.merged}"


class SavedHead(nn.Module):
    """A module trained in full (modules_to_save): a trainable copy beside the frozen original.

    The copy runs while the adapter is enabled, the original inside disable_adapter(), so
    disabling gives exactly the base model. Attribute reads (`.weight`, ...) reach the copy.
    """

    def __init__(self, original: nn.Module, binder: FactorBinder):
        super().__init__()
        self.trained = copy.deepcopy(original)
        self.original = original
        self.original.requires_grad_(False)
        self.trained.requires_grad_(True)
        object.__setattr__(self, "_binder", binder)

    def forward(self, *args, **kwargs):
        return (self.trained if self._binder.enabled else self.original)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("trained", "original"):
                raise
            return getattr(self.trained, name)
