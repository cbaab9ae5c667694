"""The one place a request's adapter is prepared, on a thread-pool thread, before any work and before
the first byte of the answer: its name checked, its folder read and validated through the store
when the resident version is not the store's, and its layers checked against the served base
model. Whatever fails here is a proper HTTP status (404, 422), never an error inside a stream.

A version already resident is held for the request (`Holder.hold_if_resident`) until its rows are
admitted, so the worker never reads the store: it attaches what was prepared, or uses what is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from ..core.errors import UniLoraError
from ..core.targeting import linear_modules, linear_shape
from ..store.io import AdapterFile
from ..store.names import BadAdapter
from ..store.source import AdapterStore, Signature


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter a request names, checked: its store name, the store version it was checked at, and
    its validated file when that version was not resident (None: the residency holds it)."""

    name: str
    signature: Signature
    file: AdapterFile | None


class Holder(Protocol):
    def hold_if_resident(self, name: str, signature: Signature, count: int) -> bool: ...

    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit in the served model: its class and the shape of every linear layer,
    taken once at load (the worker wraps layers later; this never looks at the live model again)."""

    class_name: str
    layers: dict[str, tuple[int, int]]  # name -> (in, out)

    @classmethod
    def of(cls, model: nn.Module) -> "BaseShape":
        return cls(type(model).__name__, {name: linear_shape(m) for name, m in linear_modules(model).items()})

    def check(self, name: str, adapter: AdapterFile) -> None:
        recorded = (adapter.meta.get("base_model") or {}).get("class")
        if recorded and recorded != self.class_name:
            raise BadAdapter(f"adapter '{name}' was trained on a {recorded}, and this server runs a {self.class_name}")
        for slot in adapter.layout.slots:
            shape = self.layers.get(slot.name)
            if shape is None:
                raise BadAdapter(f"adapter '{name}' was trained for another base model: it adapts layer '{slot.name}', "
                                 "which this model lacks or has, but not as a linear layer")
            if shape != (slot.in_features, slot.out_features):
                raise BadAdapter(f"adapter '{name}' was trained for another base model: layer '{slot.name}' is "
                                 f"{shape[1]}x{shape[0]} here but {slot.out_features}x{slot.in_features} in the adapter")


def prepare_adapter(store: AdapterStore, holder: Holder, name: str, holds: int = 1, base: BaseShape | None = None,
                    metrics=None) -> PreparedAdapter:
    """Adapter `name` ready for `holds` sequences (see the module docstring); UnknownAdapter (404) or
    BadAdapter (422) otherwise, each counted in the metrics' adapter errors."""
    try:
        signature = store.signature(name)
        if holder.hold_if_resident(name, signature, holds):
            return PreparedAdapter(name, signature, None)
        adapter, signature = store.read(name)
        if base is not None:
            base.check(name, adapter)
        return PreparedAdapter(name, signature, adapter)
    except UniLoraError:
        if metrics is not None:
            metrics.adapter_errors.inc()
        raise
