"""The adapted layer (the frozen base layer plus s · B (A dropout(x)) of the adapter that runs,
never forming ΔW, except in a merged copy on request) and the saved head (trained copies beside the
untouched original, as PEFT's modules_to_save). Both may serve several adapters; the router says
which one runs, or which one runs on each row of a mixed batch."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.quantized import dense_linear, layer_quantization, quantize_linear
from ..core.targeting import is_conv1d, is_quantized
from ..methods.base import ScaledFactors
from .binder import FactorBinder
from .factor_bank import FactorBank
from .routing import AdapterRouter

_EXACT_DTYPES = (torch.float32, torch.float64)
# a no-grad mix of more adapters than this gathers each row's own factors from the layer's FactorBank;
# up to it (and with gradients on) the batch multiplies by all their columns, the other rows' zeroed
MASKED_ADAPTERS = 4


class MergedCopy:
    """W + s·B A of one plain linear layer for the adapter that ran last (AdaptedModel.merged_copies):
    no-grad forwards with one adapter on the whole batch run one product with it instead of the base
    product and the adapter's two (at batch 1 each extra call costs more than its arithmetic). Kept
    while the adapter, its factors (the binder builds new ones whenever θ changes) and the base
    weight (the same tensor, storage and version: in-place changes are seen, edits through `.data`
    are not) stay the same; built as merge() builds W.

    `built` is one tuple, replaced whole, so a thread never reads one copy's weight with another's key."""

    __slots__ = ("built",)

    def __init__(self):
        # (entry, factors, base weight, its storage, (version, address, dtype), merged weight); the
        # references keep the compared objects and the storage alive, so no new object or storage
        # can take their identity or address
        self.built: tuple | None = None


@contextlib.contextmanager
def merged_copies(layers: "dict[int, AdaptedLayer]") -> Iterator[None]:
    """AdaptedModel.merged_copies(): inside the block, a forward without gradients that runs one
    adapter on the whole batch computes each adapted plain linear layer as one product with a merged
    copy, W + s·B A built as merge() builds it (so its outputs equal the merged model's), instead of
    the base product and the adapter's two: for generation at small batch sizes, where every extra
    call per layer costs. A copy is made when a layer first needs it and again when θ, the active
    adapter or the base weight changes (in place; not through `.data`). The base weights are not
    touched: other adapters, mixed batches, disable_adapter() and training run as outside. The
    copies take the adapted layers' weights' memory once more and are freed when the block ends.
    Quantized, sharded and Conv1D layers keep the unmerged path; a nested block leaves the copies
    to the outer one."""
    # plain weights only: a quantized weight (torchao's tensor subclasses, bitsandbytes' layers) or a
    # sharded one (FSDP's DTensor) keeps the unmerged path
    taken = [layer for layer in layers.values() if layer.merged_copy is None
             and type(layer.base_layer) is nn.Linear and type(layer.base_layer.weight.data) is torch.Tensor]
    for layer in taken:
        layer.merged_copy = MergedCopy()
    try:
        yield
    finally:
        for layer in taken:
            layer.merged_copy = None


@dataclass
class LayerAdapter:
    """One adapter's place in one layer: its slot in the adapter's layout and its settings."""

    slot: int
    scaling: float
    dropout: float
    binder: FactorBinder


_OWNERS: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def shared_owner(owner: list[int], device: torch.device) -> torch.Tensor:
    """The column-to-adapter map as one tensor for every layer with the same layout, so that a forward
    builds each row mask once (RowAdapters.column_mask keys on the tensor)."""
    key = (tuple(owner), str(device))
    found = _OWNERS.get(key)
    if found is None:
        found = _OWNERS[key] = torch.tensor(owner, device=device)
    return found


class AdaptedLayer(nn.Module):
    # marks a wrapper whose `base_layer` is the model's own layer (targeting looks through it)
    wraps_base_layer = True

    def __init__(self, base_layer: nn.Module, router: AdapterRouter):
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, LayerAdapter] = {}
        self.merged_adapter: str | None = None
        self._stack_cache = None  # (key, factors, concatenation) of the last mixed batch (_stacked)
        self._bank: FactorBank | None = None  # mixes of many adapters (factor_bank.py), made on first use
        self.merged_copy: MergedCopy | None = None  # set inside AdaptedModel.merged_copies() (plain linear layers)
        # Not a submodule: the router (and the projections it reaches) belongs to the model wrapper.
        object.__setattr__(self, "_router", router)

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects `layer.weight` keeps working
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_copy is not None and not torch.is_grad_enabled():
            # read from the modules' dicts: nn.Module.__getattr__ costs about 0.6 us a name, and this
            # path runs on every adapted layer for every generated token
            parameters = self._modules["base_layer"]._parameters
            weight = self._merged_weight(self.merged_copy, parameters["weight"])
            if weight is not None:
                return F.linear(x, weight, parameters["bias"])
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

    def _merged_weight(self, copy: MergedCopy, base_weight: torch.Tensor) -> torch.Tensor | None:
        """The merged weight of the adapter that runs on the whole batch, built again when what it was
        built from changed; None where the forward must take the unmerged path (a mixed batch, adapters
        disabled, this layer not adapted, dropout in train mode)."""
        router = self._router
        if self.merged_adapter is not None or not router.enabled or (router.mixing and router.rows() is not None):
            return None
        entry = self.adapters.get(router.active)
        if entry is None or (entry.dropout > 0 and self.training):
            return None
        factors = entry.binder.factors(entry.slot)
        state = (base_weight._version, base_weight.data_ptr(), base_weight.dtype)
        built = copy.built
        if built is not None and built[0] is entry and built[1] is factors and built[2] is base_weight \
                and built[4] == state:
            return built[5]
        copy.built = None  # the old copy's memory goes before the new one is made
        weight = (base_weight.float() + self.delta_weight(factors, router.active).to(base_weight.device)
                  ).to(base_weight.dtype)  # gradients are off: forward calls this only then
        copy.built = (entry, factors, base_weight, base_weight.untyped_storage(), state, weight)
        return weight

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor, rows) -> torch.Tensor:
        """Row i gets the update of its own adapter; rows of adapters that skip this layer, and
        "__base__" rows, keep the base output. Dropout is off: mixed batches are for inference.

        Two matrix products per layer, in one of two ways. A mix of many adapters (more than
        MASKED_ADAPTERS, without gradients): each row's own A and s·Bᵀ gathered from the layer's
        FactorBank, where every adapter keeps its slot while its factors stay the same, and two
        batched products, so a row does its own adapter's work only. Otherwise the batch's adapters'
        factors are concatenated once (`_stacked`, kept while the batch's adapters and their factors
        stay the same): x times every adapter's Aᵀ in one product, the columns of other rows'
        adapters zeroed, then one product with every scaled Bᵀ; the zeroed columns cost
        (adapters - 1) x the rank."""
        if len(rows.distinct) > MASKED_ADAPTERS and not torch.is_grad_enabled() and rows.has_every_factor_list():
            if self._bank is None:
                self._bank = FactorBank()
            gathered = self._bank.row_factors(self, rows, x.shape[0], x.dtype, x.device)
            if gathered is None:
                return result
            a_rows, bt_rows = gathered
            hidden = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a_rows.transpose(1, 2))  # (batch, tokens, rank)
            if hidden.dtype == result.dtype and result.is_contiguous():
                result.view(x.shape[0], -1, result.shape[-1]).baddbmm_(hidden, bt_rows)
                return result
            return result + torch.bmm(hidden, bt_rows).view(result.shape).to(result.dtype)
        stacked = self._stacked(rows, x.dtype)
        if stacked is None:
            return result
        a_all, bt_all, owner = stacked
        hidden = F.linear(x, a_all)
        if len(rows.distinct) > 1:  # one adapter on every row: nothing to zero
            mask = rows.column_mask(rows.positions(x.shape[0], x.device), owner, x.dtype)  # once per forward
            hidden = hidden * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        if not torch.is_grad_enabled() and hidden.dtype == result.dtype and result.is_contiguous():
            flat = result.view(-1, result.shape[-1])  # added into the fresh base output, as the single path does
            flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), bt_all)
            return result
        return result + torch.matmul(hidden, bt_all).to(result.dtype)

    def _stacked(self, rows, dtype: torch.dtype):
        """(every present adapter's A, its scaled Bᵀ, the adapter of each of their rows: its position in
        `rows.distinct`), concatenated; None when no adapter of the batch adapts this layer. Kept while
        the batch's adapters read the same factor lists (a binder rebuilds factors as a new list)."""
        names = rows.distinct
        lists = rows.factor_lists
        kept = self._stack_cache
        if (lists is not None and kept is not None and kept[0] == (tuple(names), dtype)
                and len(kept[1]) == len(lists) and all(a is b for a, b in zip(kept[1], lists))):
            return kept[2]
        parts_a, parts_bt, owner = [], [], []
        for index, name in enumerate(names):
            entry = self.adapters.get(name)
            if entry is None:
                continue
            found = entry.binder.factors(entry.slot)
            a, bt = found.dense() if isinstance(found, ScaledFactors) else found
            parts_a.append(a.to(dtype))
            parts_bt.append(bt.to(dtype) * entry.scaling)
            owner += [index] * a.shape[0]
        stacked = None
        if parts_a:
            stacked = (torch.cat(parts_a), torch.cat(parts_bt), shared_owner(owner, parts_a[0].device))
        if lists is not None and all(found is not None for name, found in zip(names, lists) if name in self.adapters):
            self._stack_cache = ((tuple(names), dtype), lists, stacked)
        return stacked

    # copies and pickles carry the adapters, never the factors derived for mixed batches
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_stack_cache"] = state["_bank"] = None
        state["merged_copy"] = None
        return state

    # --- adapters -------------------------------------------------------------------
    def add(self, name: str, entry: LayerAdapter) -> None:
        self.adapters[name] = entry
        # the bank needs nothing: the name is new to the model, and remove() freed any slot it had
        self._stack_cache = None

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._stack_cache = None
        if self._bank is not None:
            self._bank.forget(name)

    # --- merging --------------------------------------------------------------------
    def delta_weight(self, factors, name: str) -> torch.Tensor:
        """s · B A of adapter `name` in the base weight's own layout ((in, out) for Conv1D), in fp32."""
        a, bt = factors.dense() if isinstance(factors, ScaledFactors) else factors
        delta = (bt.t().float() @ a.float()) * self.adapters[name].scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self, factors, name: str, to: torch.dtype | None = None) -> None:
        """W += s·B A, added in fp32 and rounded once to the weight's dtype. A quantized layer is
        dequantized, W + s·B A formed in its compute dtype, and quantized again the same way (`to`
        None), or kept as a plain linear layer of dtype `to`; the quantized layer is kept aside, and
        unmerge puts it back as it was, bit for bit."""
        if self.merged:
            return
        weight = self.base_layer.weight
        if is_quantized(weight):
            # in the dtype the layer computes in (bitsandbytes' compute_dtype; torchao's dequantized weight's)
            merged = dense_linear(self.base_layer, to, add=self.delta_weight(factors, name))
            if to is None:
                merged = quantize_linear(merged, layer_quantization(self.base_layer)).requires_grad_(False)
            merged.train(self.base_layer.training)  # bitsandbytes computes otherwise in train and eval mode
            object.__setattr__(self, "_quantized_layer", self.base_layer)  # not a submodule: not saved twice
            self.base_layer = merged
            self.merged_adapter = name
            return
        weight.copy_((weight.float() + self.delta_weight(factors, name).to(weight.device)).to(weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self, factors) -> bool:
        """W -= s·B A. Returns False when the weight's dtype cannot restore W exactly."""
        if not self.merged:
            return True
        quantized = getattr(self, "_quantized_layer", None)
        if quantized is not None:
            self.base_layer = quantized
            object.__setattr__(self, "_quantized_layer", None)
            self.merged_adapter = None
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
