"""The adapted layer (the frozen base layer plus s · B (A dropout(x)) of the adapter that runs,
never forming ΔW) and the saved head (trained copies beside the untouched original, as PEFT's
modules_to_save). Both may serve several adapters; the router says which one runs, or which
one runs on each row of a mixed batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.targeting import is_conv1d
from ..methods.base import ScaledFactors
from .binder import FactorBinder
from .routing import AdapterRouter

_EXACT_DTYPES = (torch.float32, torch.float64)


@dataclass
class LayerAdapter:
    """One adapter's place in one layer: its slot in the adapter's layout and its settings."""

    slot: int
    scaling: float
    dropout: float
    binder: FactorBinder


class AdaptedLayer(nn.Module):
    # marks a wrapper whose `base_layer` is the model's own layer (targeting looks through it)
    wraps_base_layer = True

    def __init__(self, base_layer: nn.Module, router: AdapterRouter):
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, LayerAdapter] = {}
        self.merged_adapter: str | None = None
        # Not a submodule: the router (and the projections it reaches) belongs to the model wrapper.
        object.__setattr__(self, "_router", router)

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects `layer.weight` keeps working
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        router = self._router
        if self.merged_adapter is not None or not router.enabled:
            return result
        if router.mixing:
            rows = router.rows()
            if rows is not None:
                return self._mixed_forward(x, result, rows)
        entry = self.adapters.get(router.active)
        if entry is None:
            return result
        factors = entry.binder.factors(entry.slot)
        if entry.dropout > 0:
            x = F.dropout(x, entry.dropout, training=self.training)
        if isinstance(factors, ScaledFactors):  # scale activations; the frozen matrices get no weight gradient
            a, d, bt, b = (t.to(x.dtype) for t in factors)
            return result + torch.matmul(F.linear(x, a) * d, bt) * (b * entry.scaling)
        a, bt = factors
        if not torch.is_grad_enabled() and a.dtype == x.dtype == result.dtype and result.is_contiguous():
            # inference (generation: hundreds of tiny calls per token): one fused multiply-add into
            # the fresh base output instead of a matmul, a scale and an add
            flat = result.view(-1, result.shape[-1])
            flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]), a), bt, alpha=entry.scaling)
            return result
        return result + torch.matmul(F.linear(x, a.to(x.dtype)), bt.to(x.dtype)) * entry.scaling

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor, rows) -> torch.Tensor:
        """Row i gets the update of its own adapter; rows of adapters that skip this layer, and
        "__base__" rows, keep the base output. One gather of each row's factors (zero-padded to
        the largest rank, the scale folded into Bᵀ) and two batched matmuls, however many
        adapters the batch mixes. Dropout is off: mixed batches are for inference."""
        stacked_a, stacked_bt = [], []
        for name in rows.distinct:
            entry = self.adapters.get(name)
            if entry is None:
                stacked_a.append(None)
                stacked_bt.append(None)
                continue
            factors = entry.binder.factors(entry.slot)
            a, bt = factors.dense() if isinstance(factors, ScaledFactors) else factors
            stacked_a.append(a.to(x.dtype))
            stacked_bt.append(bt.to(x.dtype) * entry.scaling)
        present = [a for a in stacked_a if a is not None]
        if not present:
            return result
        rank = max(a.shape[0] for a in present)
        n_in, n_out = x.shape[-1], result.shape[-1]

        def padded(t, width):  # a missing adapter adds zero; a lower rank adds zero rows
            if t is None:
                return x.new_zeros(rank, width)
            return t if t.shape[0] == rank else torch.cat([t, t.new_zeros(rank - t.shape[0], width)])

        positions = rows.positions(x.shape[0], x.device)
        a_rows = torch.stack([padded(a, n_in) for a in stacked_a])[positions]  # (batch, r, in)
        bt_rows = torch.stack([padded(bt, n_out) for bt in stacked_bt])[positions]  # (batch, r, out)
        update = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, n_in), a_rows.transpose(1, 2)), bt_rows)
        return result + update.view(result.shape).to(result.dtype)

    # --- adapters -------------------------------------------------------------------
    def add(self, name: str, entry: LayerAdapter) -> None:
        self.adapters[name] = entry

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    # --- merging --------------------------------------------------------------------
    def delta_weight(self, factors, name: str) -> torch.Tensor:
        """s · B A of adapter `name` in the base weight's own layout ((in, out) for Conv1D), in fp32."""
        a, bt = factors.dense() if isinstance(factors, ScaledFactors) else factors
        delta = (bt.t().float() @ a.float()) * self.adapters[name].scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self, factors, name: str) -> None:
        """W += s·B A, added in fp32 and rounded once to the weight's dtype."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight(factors, name).to(weight.device)).to(weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self, factors) -> bool:
        """W -= s·B A. Returns False when the weight's dtype cannot restore W exactly."""
        if not self.merged:
            return True
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(factors, self.merged_adapter).to(weight.device)).to(weight.dtype))
        self.merged_adapter = None
        return weight.dtype in _EXACT_DTYPES

    def extra_repr(self) -> str:
        slots = ", ".join(f"{n}: slot {e.slot}" for n, e in self.adapters.items())
        return f"adapters={{{slots}}}, merged={self.merged_adapter}"


class SavedHead(nn.Module):
    """A module trained in full (modules_to_save): one trainable copy per adapter that trains it,
    beside the frozen original.

    The active adapter's copy runs while adapters are enabled (the original when the active
    adapter has no copy here), the original inside disable_adapter(), so disabling gives exactly
    the base model. Attribute reads (`.weight`, ...) reach the active copy.
    """

    is_saved_head = True  # targeting never looks inside

    def __init__(self, original: nn.Module, router: AdapterRouter):
        super().__init__()
        self.original = original
        self.original.requires_grad_(False)
        self.copies = nn.ModuleDict()
        object.__setattr__(self, "_router", router)

    def add(self, name: str) -> None:
        trained = copy.deepcopy(self.original)
        trained.requires_grad_(True)
        self.copies[name] = trained

    def remove(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]

    @property
    def trained(self) -> nn.Module:
        """The active adapter's copy (the original where it has none)."""
        active = self._router.active
        return self.copies[active] if active in self.copies else self.original

    def forward(self, *args, **kwargs):
        router = self._router
        if not router.enabled:
            return self.original(*args, **kwargs)
        rows = router.rows() if router.mixing else None
        if rows is not None:
            return self._mixed_forward(rows, *args, **kwargs)
        return self.trained(*args, **kwargs)

    def _mixed_forward(self, rows, x: torch.Tensor, *args, **kwargs):
        groups = rows.groups(x.shape[0], x.device)
        output = None
        for name, indices in groups.items():
            module = self.copies[name] if name in self.copies else self.original
            part = module(x.index_select(0, indices), *args, **kwargs)
            if output is None:
                output = part.new_empty((x.shape[0], *part.shape[1:]))
            output = output.index_copy(0, indices, part)
        return output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("copies", "original"):
                raise
            return getattr(self.trained, name)
