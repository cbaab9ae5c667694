"""Which adapters are attached to the served model: an LRU bounded by count and by bytes.

Only the worker thread changes it (attaching and detaching change the model's modules, which a
forward must not see half-done); a request's thread asks `hold_if_resident` whether the store's
version is attached, and if so holds it (never evicted) until the worker admits the request.

Each adapter is attached under an internal name (`r0`, `r1`, ...), never the client's: store
names may hold dots, which module names cannot, and a folder replaced while its old version still
runs rows is attached beside it under a new internal name; the old one leaves when its last row
finishes. An adapter some running row uses is never evicted.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from torch import nn

from ..core.errors import LayoutMismatchError
from ..engine.model import AdaptedModel
from ..store.io import AdapterFile
from ..store.names import BadAdapter
from .adapters import BaseShape


@dataclass
class Resident:
    internal: str
    signature: object


class Residency:
    def __init__(self, base: nn.Module, max_resident: int, max_bytes: int, factor_cache_bytes: int, metrics=None):
        self.base = base
        self.shape = BaseShape.of(base)  # what an adapter must fit, taken before any layer is wrapped
        self.model: AdaptedModel | None = None  # made when the first adapter arrives
        self.max_resident = max_resident
        self.max_bytes = max_bytes
        self.factor_cache_bytes = factor_cache_bytes
        self.metrics = metrics
        self.entries: OrderedDict[str, Resident] = OrderedDict()  # store name -> resident, oldest first
        self.retired: list[str] = []  # internal names of replaced versions still running rows
        self.held_bytes = 0
        self.holds: Counter[str] = Counter()  # store name -> requests prepared on its resident version
        self._lock = threading.Lock()  # entries and holds, between the worker and request threads
        self._measured = True  # held_bytes is current: nothing attached or detached since it was measured
        self._names = (f"r{i}" for i in itertools.count())

    @property
    def served(self) -> nn.Module:
        """What forwards run on: the adapted model, or the base model before any adapter."""
        return self.model if self.model is not None else self.base

    def signature_of(self, name: str):
        with self._lock:
            entry = self.entries.get(name)
        return entry.signature if entry is not None else None

    def hold_if_resident(self, name: str, signature, count: int = 1) -> bool:
        """Hold adapter `name` for `count` sequences when `signature` is its resident version."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is None or entry.signature != signature:
                return False
            self.holds[name] += count
            return True

    def release(self, name: str) -> None:
        """One sequence's hold ends (it was admitted, or it ended before)."""
        with self._lock:
            self.holds[name] -= 1
            if self.holds[name] <= 0:
                del self.holds[name]

    # --- attaching -------------------------------------------------------------------------
    def acquire(self, name: str, adapter: AdapterFile | None, signature) -> str:
        """The internal name of adapter `name` at `signature`, attaching `adapter` (read from the
        store) when that version is not resident. A held adapter (`adapter` None) is never evicted; it
        runs its resident version, or the newer one that replaced it in place since."""
        entry = self.entries.get(name)
        if entry is not None and (entry.signature == signature or adapter is None):
            with self._lock:
                self.entries.move_to_end(name)
            return entry.internal
        if adapter is None:  # neither resident nor read: held adapters are never evicted, so a bug of ours
            raise RuntimeError(f"adapter '{name}' is not resident and no copy was read for it")
        self.shape.check(name, adapter)
        internal = next(self._names)
        started = time.perf_counter()
        try:
            if self.model is None:
                self.model = AdaptedModel.from_pretrained(self.base, adapter, adapter_name=internal)
                self.model.router.cache_limit_bytes = self.factor_cache_bytes
            else:
                self.model.load_adapter(adapter, internal)
        except LayoutMismatchError as err:
            raise BadAdapter(f"adapter '{name}' was trained for another base model: {err}") from None
        if entry is not None:
            self.retired.append(entry.internal)
        with self._lock:
            self.entries[name] = Resident(internal, signature)
        self._measured = False
        if self.metrics is not None:
            self.metrics.adapter_loads.inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return internal

    # --- evicting --------------------------------------------------------------------------
    def trim(self, in_use: set[str]) -> None:
        """Detach retired versions no row runs, then the least recently used adapters beyond the
        bounds (never one in `in_use`, internal names). Called on every admission, so it returns at
        once when nothing changed and the bounds hold."""
        within = len(self.entries) <= self.max_resident and self.held_bytes <= self.max_bytes
        if self._measured and within and not self.retired:
            return
        for internal in [r for r in self.retired if r not in in_use]:
            if self._detach(internal):
                self.retired.remove(internal)
        self.held_bytes = self._measure()
        self._measured = True
        for name in list(self.entries):
            if len(self.entries) <= self.max_resident and self.held_bytes <= self.max_bytes:
                break
            internal = self.entries[name].internal
            with self._lock:
                if internal in in_use or name in self.holds or len(self.model.adapters) == 1:
                    continue
                del self.entries[name]
            self._detach(internal)
            self.held_bytes = self._measure()
        if self.metrics is not None:
            self.metrics.resident_adapters.set(len(self.entries))
            self.metrics.resident_bytes.set(self.held_bytes)

    def _detach(self, internal: str) -> bool:
        """Detach an adapter; the model's last one stays (it runs no row unless asked for)."""
        if self.model is None or internal not in self.model.adapters:
            return True
        if len(self.model.adapters) == 1:
            return False
        self.model.delete_adapter(internal)
        if self.metrics is not None:
            self.metrics.adapter_evictions.inc()
        return True

    def _measure(self) -> int:
        """Bytes of the distinct tensors the resident adapters hold (parts shared by adapters of one
        seed count once), their heads included."""
        if self.model is None:
            return 0
        storages = {}
        for name in self.model.adapters:
            tensors = [*self.model.projections[name].parameters(), *self.model.projections[name].buffers(),
                       *self.model.head_parameters(name).values()]
            for t in tensors:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())
