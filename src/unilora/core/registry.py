"""Every method by name. Each file in methods/ registers its Projection class here with
`@register_method`, so that a new method is one file plus its import in methods/__init__.py. The
registry sits in core so that the adapter config can check a method's name without importing the
methods (which import the config). Reading it loads the built-in methods first, so what it holds
does not depend on what the caller happened to import before (`import unilora` loads nothing)."""

from __future__ import annotations

import importlib
import sys

from .errors import UniLoraError

BUILT_IN_METHODS = "unilora.methods"  # each of its modules registers its method on import

# method name -> its Projection subclass, in the order they registered
PROJECTIONS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make `cls` (a Projection subclass with a `method` name) available by name."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} sets no `method` name to register under")
    if PROJECTIONS.get(name, cls) is not cls:
        raise ValueError(f"method '{name}' is already registered, by {PROJECTIONS[name].__name__}")
    peft_type = getattr(cls, "peft_type", None)
    taken = [other for other, known in PROJECTIONS.items() if other != name and peft_type
             and getattr(known, "peft_type", None) == peft_type]
    if taken:  # convert finds our method by PEFT's type: one method each (a subclass sets its own or None)
        raise ValueError(f"PEFT type '{peft_type}' is already mapped, by method '{taken[0]}'")
    PROJECTIONS[name] = cls
    return cls


def _registered() -> dict[str, type]:
    if BUILT_IN_METHODS not in sys.modules:  # (while it imports, it is in sys.modules: no loop)
        importlib.import_module(BUILT_IN_METHODS)
    return PROJECTIONS


def method_names() -> tuple[str, ...]:
    return tuple(_registered())


def method_summaries() -> dict[str, str]:
    """method name -> its one line: what trains and what is stored."""
    return {name: getattr(cls, "summary", "") for name, cls in _registered().items()}


def registered_options() -> dict[str, type]:
    """method name -> its options class (the `MethodOptions` dataclass its Projection names)."""
    return {name: cls.options for name, cls in _registered().items()}


def projection_class(method: str) -> type:
    cls = _registered().get(method)
    if cls is None:
        raise UniLoraError(f"unknown method {method!r}; choose one of {', '.join(PROJECTIONS)}")
    return cls
