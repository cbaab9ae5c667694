"""AdapterConfig: the settings every method shares, and the method's own options, validated up front.

A method declares its options in its own file (as PEFT's per-tuner configs do): a `MethodOptions`
dataclass whose fields are made with `option(default, check, help)`, named on its Projection class
(`options = ...`). The config reads and checks them by the method's name, `unilora finetune` turns
the ones with a `help` into command-line options, and a saved adapter records exactly the method's
own. Fields are read as attributes of the config (`config.theta_dim`), as before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import UniLoraError
from .registry import method_names, projection_class, registered_options

COMMON_FIELDS = ("method", "target_modules", "rank", "alpha", "dropout", "modules_to_save", "seed")


# --- what an option accepts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Integer:
    low: int
    high: int | None = None
    optional: bool = False  # None allowed: the method chooses the value from the layout

    def span(self) -> str:
        return f">= {self.low}" if self.high is None else f"from {self.low} to {self.high}"

    def problem(self, value) -> str | None:
        if (self.optional and value is None) or (isinstance(value, int) and not isinstance(value, bool)
                                                 and self.low <= value <= (self.high or 2**62)):
            return None
        return f"must be an integer {self.span()}{' or None' if self.optional else ''}, got {value!r}"

    def parse(self, text: str) -> int:
        """A command-line value, or ValueError saying what is expected."""
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or self.problem(value):
            raise ValueError(f"expected an integer {self.span()}, got '{text}'")
        return value


@dataclass(frozen=True)
class Number:
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    def span(self) -> str:
        low = "" if self.low == -math.inf else f"{'>' if self.open_low else '>='} {self.low:g}"
        high = "" if self.high == math.inf else f"<= {self.high:g}"
        return " and ".join(part for part in (low, high) if part)

    def problem(self, value) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and (value > self.low if self.open_low else value >= self.low) and value <= self.high:
            return None
        return f"must be a finite number {self.span()}, got {value!r}".replace("  ", " ")

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if self.problem(value):
            raise ValueError(f"expected a finite number {self.span()}, got '{text}'".replace("  ", " "))
        return value


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def problem(self, value) -> str | None:
        if isinstance(value, str) and value in self.values:
            return None
        return f"must be one of {', '.join(self.values)}, got {value!r}"


def option(default, check, help: str | None = None) -> Any:
    """A field of a method's options: its default, what it accepts, and (where given) the help of its
    command-line option (`--theta-dim` for `theta_dim`; an option without help is Python's only)."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


@dataclass
class MethodOptions:
    """A method's own settings (none for a method that needs none). Subclasses are dataclasses of
    `option(...)` fields, declared in the method's file."""

    # fields added after adapters of this method were first saved: left out of a saved config while
    # they hold their defaults, so that earlier versions still read those adapters
    left_out_at_default: ClassVar[tuple[str, ...]] = ()
    # optional fields the method fills in from the layout (None until then); a saved adapter records them
    chosen_from_layout: ClassVar[tuple[str, ...]] = ()

    def check(self, config: "AdapterConfig") -> None:
        """Checks across fields (beyond each field's own), raising UniLoraError."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in self.left_out_at_default and data[f.name] == f.default:
                del data[f.name]
        return data


def option_fields(options_class: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_class))


def other_methods_fields(method: str) -> dict[str, dataclasses.Field]:
    """The options other registered methods declare, by name (a config of `method` checks and ignores them)."""
    found: dict[str, dataclasses.Field] = {}
    for name, cls in registered_options().items():
        if name != method:
            for f in option_fields(cls):
                found.setdefault(f.name, f)
    return found


def command_line_options() -> dict[str, tuple[Any, str, list[str]]]:
    """The methods' options that carry a help, by field name: (what it accepts, its help, the methods
    that have it), for `unilora finetune` / `compress` / `count`."""
    found: dict[str, tuple[Any, str, list[str]]] = {}
    for method, cls in registered_options().items():
        for f in option_fields(cls):
            if f.metadata.get("help"):
                check, help_text, methods = found.get(f.name, (f.metadata["check"], f.metadata["help"], []))
                found[f.name] = (check, help_text, [*methods, method])
    return found


class AdapterConfig:
    """The adapter's configuration: the shared fields below, plus the method's own options as keyword
    arguments (`AdapterConfig(method="unilora", theta_dim=23040)`). Options of another method are
    ignored, as a saved config of an earlier version holds every method's; an unknown name is refused.

    target_modules: a list of module-name suffixes ("query" matches "...attention.self.query"),
    a regular expression string (matched against the full module name), or "all-linear".
    """

    def __init__(self, method: str = "unilora", target_modules: list | str | None = None, rank: int = 4,
                 alpha: float | None = None, dropout: float = 0.0, modules_to_save: list | None = None,
                 seed: int = 0, **options):
        self.method = method
        self.target_modules = ["query", "value"] if target_modules is None else target_modules
        self.rank = rank
        self.alpha = alpha  # scaling = alpha / rank; None means scaling 1
        self.dropout = dropout
        self.modules_to_save = [] if modules_to_save is None else modules_to_save  # trained in full and saved
        self.seed = seed
        if not (isinstance(method, str) and method in method_names()):
            raise UniLoraError(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
        options_class = projection_class(method).options
        own = {f.name for f in option_fields(options_class)}
        others = other_methods_fields(method)
        unknown = sorted(set(options) - own - set(others))
        if unknown:
            known = sorted({*COMMON_FIELDS, *own, *others})
            raise UniLoraError(f"unknown adapter config keys {unknown}; this unilora version knows {known}")
        for name in sorted(set(options) - own):  # unused here, yet a damaged value is still refused
            problem = others[name].metadata["check"].problem(options[name])
            if problem and options[name] is not None:
                raise UniLoraError(f"{name} {problem}")
        self.options = options_class(**{k: v for k, v in options.items() if k in own})
        self.validate()

    def __getattr__(self, name: str):
        options = self.__dict__.get("options")  # not there while a copy is being made
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"'{self.__dict__.get('method', 'an')}' adapter config has no field '{name}'")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise UniLoraError(message)

        def checked(name: str, check, value) -> None:
            problem = check.problem(value)
            need(problem is None, f"{name} {problem}")

        checked("rank", Integer(1, 2**20), self.rank)
        checked("seed", Integer(0, 2**63 - 1), self.seed)
        need(self.alpha is None or Number(0.0, open_low=True).problem(self.alpha) is None,
             f"alpha must be a positive number or None, got {self.alpha!r}")
        checked("dropout", Number(0.0, 0.999999), self.dropout)
        need(
            (isinstance(self.target_modules, str) and bool(self.target_modules))
            or (isinstance(self.target_modules, (list, tuple)) and bool(self.target_modules)
                and all(isinstance(t, str) and t for t in self.target_modules)),
            "target_modules must be a non-empty list of name suffixes, a regex string, or 'all-linear'",
        )
        need(isinstance(self.modules_to_save, (list, tuple)) and all(isinstance(m, str) and m for m in self.modules_to_save),
             f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        for f in option_fields(type(self.options)):
            checked(f.name, f.metadata["check"], getattr(self.options, f.name))
        self.options.check(self)

    def replace(self, **changes) -> "AdapterConfig":
        """A copy with `changes` (shared fields or the method's options), validated."""
        return AdapterConfig(**{**self.to_dict(keep_all=True), **changes})

    def to_dict(self, keep_all: bool = False) -> dict[str, Any]:
        """The shared fields and the method's options (`keep_all`: also those left out at their default)."""
        data = {name: getattr(self, name) for name in COMMON_FIELDS}
        data.update(dataclasses.asdict(self.options) if keep_all else self.options.to_dict())
        for key in ("target_modules", "modules_to_save"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise UniLoraError(f"an adapter config must be a JSON object, found {type(data).__name__}")
        if "method" in data and not isinstance(data["method"], str):
            raise UniLoraError(f"unknown method {data['method']!r}; choose one of {', '.join(method_names())}")
        return cls(**data)

    def __eq__(self, other) -> bool:
        return isinstance(other, AdapterConfig) and self.to_dict(keep_all=True) == other.to_dict(keep_all=True)

    def __repr__(self) -> str:
        return f"AdapterConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict(keep_all=True).items())})"
