"""One layer's factors for mixed batches of many adapters, kept in the layout a per-row product wants.

Each adapter a layer has run in such a mix holds a slot of two stacked tensors, A (slots, rank, in)
and s·Bᵀ (slots, rank, out), zero-padded to the largest rank; slot 0 stays zero, for the base
model's rows and for adapters that skip the layer. A forward gathers its rows' slots (kept for the
next forward of the same mix: the same rows and factor lists) and runs two batched products. An
adapter keeps its slot while its factors stay the same, so rows joining and leaving a server's
batch, and the forwards between its steps (a prompt's prefill on one adapter), move no factors: only
an adapter new to the layer, or one whose factors were rebuilt, is copied in.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from ..methods.base import ScaledFactors

# adapters a layer keeps (more only while one mix needs them), the least recently mixed leaving first:
# twice the server's default batch; 64 x rank x (in + out) numbers per layer when full
BANK_SLOTS = 64
# rows x rank up to which the last forward's gathered rows are kept for the next (a server's decode
# steps run the same rows until one joins or leaves): 1,024 rows of A and s·Bᵀ per layer at most
ROWS_KEPT = 1024


class FactorBank:
    def __init__(self):
        self.a: torch.Tensor | None = None
        self.bt: torch.Tensor | None = None
        # name -> (its LayerAdapter, a weak reference to the factor list its slot was filled from, slot),
        # least recently mixed first. Weak: a kept slot must not keep an adapter's whole reconstruction alive.
        self.held: OrderedDict[str, tuple] = OrderedDict()
        self._mix = None  # ((distinct names, dtype, device), their factor lists, slot of each as a tensor or None)
        self._rows = None  # (the rows' mix token, (batch, dtype, device), each row's A and s·Bᵀ) of the last forward
        self._lock = threading.Lock()  # no-grad forwards may run from several threads; slots are shared

    def row_factors(self, layer, rows, batch: int, dtype: torch.dtype, device: torch.device):
        """Each row's A (batch, rank, in) and s·Bᵀ (batch, rank, out) for a no-grad forward of a mix,
        or None when no adapter of the mix adapts this layer. Copies, read only: a slot refilled later
        does not reach them. The last forward's are kept for a forward with the same mix token (routing.py:
        the same rows, and every adapter's factor list the same, so none of their slots was refilled)."""
        layout = (batch, dtype, device)
        kept = self._rows  # read without the lock: a kept tuple is replaced, never changed
        if kept is not None and kept[0] is rows.mix and kept[1] == layout:
            return kept[2]  # the same rows and factor lists as the last forward (a decode step after a decode step)
        with self._lock:
            slots = self._slots(layer, rows, dtype, device)
            if slots is None:
                gathered = None
            else:
                row_slots = slots.index_select(0, rows.positions(batch, device))
                gathered = self.a.index_select(0, row_slots), self.bt.index_select(0, row_slots)
            keep = rows.mix is not None and (slots is None or batch * self.a.shape[1] <= ROWS_KEPT)
            self._rows = (rows.mix, layout, gathered) if keep else None
            return gathered

    def _slots(self, layer, rows, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The slot of each of the mix's distinct adapters (0: the base, or an adapter this layer does
        not have), filling the slots of adapters new to the bank or whose factors were rebuilt."""
        names, lists = rows.distinct, rows.factor_lists
        key = (tuple(names), dtype, device)
        kept = self._mix
        if kept is not None and kept[0] == key and all(a is b for a, b in zip(kept[1], lists)):
            return kept[2]  # the same adapters with the same factors as the last mix: nothing moves
        if self.a is not None and (self.a.dtype != dtype or self.a.device != device):
            self.clear()
        if self.a is not None and self.a.is_inference() and not torch.is_inference_mode_enabled():
            # made under torch.inference_mode(): such tensors refuse the in-place fills outside it
            self.a, self.bt = self.a.clone(), self.bt.clone()
        slots = []
        for name, factor_list in zip(names, lists):
            entry = layer.adapters.get(name)
            if entry is None:
                slots.append(0)
                continue
            held = self.held.get(name)
            if held is not None and held[0] is entry and held[1]() is factor_list:
                slot = held[2]
            else:
                slot = held[2] if held is not None else self._free_slot(set(names))
                self._fill(slot, entry, factor_list, dtype, device)
                self.held[name] = (entry, weakref.ref(factor_list), slot)
            self.held.move_to_end(name)
            slots.append(slot)
        found = torch.tensor(slots, device=device) if any(slots) else None
        self._mix = (key, lists, found)
        return found

    def _free_slot(self, in_mix: set[str]) -> int:
        """A slot for an adapter new to the bank: with BANK_SLOTS adapters held, the least recently
        mixed one's (never one of this mix); else one no adapter holds; else a new one."""
        if len(self.held) >= BANK_SLOTS:
            for name in self.held:
                if name not in in_mix:
                    return self.held.pop(name)[2]
        taken = {held[2] for held in self.held.values()}
        capacity = 0 if self.a is None else self.a.shape[0]
        for slot in range(1, capacity):
            if slot not in taken:
                return slot
        return max(capacity, 1)  # _fill grows the stack

    def _fill(self, slot: int, entry, factor_list, dtype: torch.dtype, device: torch.device) -> None:
        found = factor_list[entry.slot]
        a, bt = found.dense() if isinstance(found, ScaledFactors) else found
        a, bt = a.detach().to(device, dtype), bt.detach().to(device, dtype) * entry.scaling
        rank = a.shape[0]
        capacity = 0 if self.a is None else self.a.shape[0]
        if slot >= capacity or rank > self.a.shape[1]:
            self._grow(capacity if slot < capacity else max(slot + 1, 2 * capacity), rank, a, bt)
        self.a[slot].zero_()  # a smaller rank than the slot's last adapter leaves zero rows
        self.bt[slot].zero_()
        self.a[slot, :rank] = a
        self.bt[slot, :rank] = bt

    def _grow(self, slots: int, rank: int, a: torch.Tensor, bt: torch.Tensor) -> None:
        """Room for `slots` slots of at least `rank` rows; what the bank held is kept in place."""
        old_a, old_bt = self.a, self.bt
        rank = max(rank, 0 if old_a is None else old_a.shape[1])
        self.a = a.new_zeros(slots, rank, a.shape[1])
        self.bt = bt.new_zeros(slots, rank, bt.shape[1])
        if old_a is not None:
            self.a[: old_a.shape[0], : old_a.shape[1]] = old_a
            self.bt[: old_bt.shape[0], : old_bt.shape[1]] = old_bt

    def forget(self, name: str) -> None:
        """A removed adapter: its slot is free again and its entry no longer held."""
        with self._lock:
            self.held.pop(name, None)
            self._mix = self._rows = None

    def clear(self) -> None:
        self.a = self.bt = None
        self.held.clear()
        self._mix = self._rows = None
