"""Merging, for AdaptedModel: s·B A of the active adapter added into the base weights (merge,
unmerge, merge_and_unload), or kept in copies beside them (merged_copies)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from torch import nn

from ..core.quantized import dequantize_model
from .injection import unwrap
from .layers import merged_copies
from .merge_check import MergeError, measure_merge, merge_dtype


class Merging:
    """AdaptedModel's merging methods (they read its adapters, projection, router and hooks)."""

    def merged_copies(self) -> contextlib.AbstractContextManager:
        """Inside the block, no-grad forwards of one adapter run each plain linear layer as one product
        with a merged copy W + s·B A, the base weights untouched (layers.merged_copies)."""
        return merged_copies({id(layer): layer for adapter in self._adapters.values() for layer in adapter.layers})

    @property
    def merged(self) -> bool:
        return any(layer.merged for adapter in self._adapters.values() for layer in adapter.layers)

    def merge(self, to=None, check=None) -> MergeError | None:
        """Add s·B A of the active adapter (VB-LoRA: its eval selection) into every weight it adapts:
        no inference overhead until unmerge(). A quantized base's layers are quantized again as they
        were, or kept in dtype `to` ("float32", ...: the one the model runs in). `check` (one batch:
        keyword inputs or input ids): measure what the merge changed there, and return it."""
        dtype, factors = merge_dtype(to), self.projection.eval_factors()

        def merge_layers() -> None:
            for slot, layer in enumerate(self._active.layers):
                layer.merge(factors[slot], self.router.active, to=dtype)
            self.binder.invalidate()

        layers = {slot.name: layer for slot, layer in zip(self._active.layout.slots, self._active.layers)}
        return merge_layers() if check is None else measure_merge(self, layers, check, merge_layers)

    def unmerge(self) -> None:
        factors = self.projection.eval_factors()
        exact = all([layer.unmerge(factors[slot]) for slot, layer in enumerate(self._active.layers)])
        if not exact and not self._warned_inexact_unmerge:
            self._warned_inexact_unmerge = True
            warnings.warn(
                "unmerge() on bfloat16/float16 weights cannot restore them exactly (W + ΔW was rounded when "
                "merged); keep the base weights, or reload the base model, where exact weights matter",
                stacklevel=2,
            )

    def merge_and_unload(self, to=None) -> nn.Module:
        """Merge the active adapter, put the original layer objects back, and return the plain
        base model (with the active adapter's trained heads). Other adapters are dropped. With `to`
        ("float32", ...), every quantized layer is dequantized and the model cast: one to write out."""
        self.merge(to=to)
        active = self.router.active
        for adapter in self._adapters.values():
            unwrap(self.model, adapter.layers, adapter.layout, adapter.head_modules, keep=active)
        self._adapters = {active: dataclasses.replace(self._active, layers=[], head_modules=[])}
        for name in [n for n in self.projections if n != active]:
            del self.projections[name]
            self.router.remove(name)
        for hook in self._hooks:  # the plain model must not pay for (or reach) the projection
            hook.remove()
        self._hooks = []
        return self.model if to is None else dequantize_model(self.model, merge_dtype(to))
