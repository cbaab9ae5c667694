"""The adapted layer: the frozen base layer plus s · B (A dropout(x)), never forming ΔW."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binder import FactorBinder
from .methods.base import ScaledFactors
from .targeting import is_conv1d


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
        return result + torch.matmul(F.linear(x, a.to(x.dtype)), bt.to(x.dtype)) * self.scaling

    # --- merging --------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s · B A in the base weight's own layout ((in, out) for Conv1D), computed in fp32."""
        factors = self._binder.factors(self.slot)
        a, bt = factors.dense() if isinstance(factors, ScaledFactors) else factors
        delta = (bt.t().float() @ a.float()) * self.scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"slot={self.slot}, scaling={self.scaling}, merged={self.merged}"
