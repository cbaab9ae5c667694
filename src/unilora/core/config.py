"""AdapterConfig: every hyperparameter of every method, validated up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import UniLoraError
from .registry import method_names

VBLORA_SELECTIONS = ("topk", "all", "noisy_topk", "gumbel", "st_gumbel")
UNILORA_INITS = ("uniform", "zero_delta")

# fields that later versions added, left out of a saved config while they hold their defaults
_LEFT_OUT_AT_DEFAULT = {"fixed_parts": "seeded", "u": 64, "weight_tying": 0.0}


@dataclass
class AdapterConfig:
    """Configuration shared by all methods; fields that a method does not use are ignored.

    target_modules: a list of module-name suffixes ("query" matches "...attention.self.query"),
    a regular expression string (matched against the full module name), or "all-linear".
    """

    method: str = "unilora"
    target_modules: Union[list, str] = field(default_factory=lambda: ["query", "value"])
    rank: int = 4
    alpha: float | None = None  # scaling = alpha / rank; None means scaling 1
    dropout: float = 0.0
    modules_to_save: list = field(default_factory=list)  # trained in full and saved (e.g. a classifier head)
    seed: int = 0
    # Uni-LoRA and Fastfood: length of the one trainable vector θ_d
    theta_dim: int = 23040
    init: str = "uniform"  # Uni-LoRA: "uniform" (U(-s, s)) or "zero_delta" (ΔW = 0 at step 0)
    # Uni-LoRA and VeRA: "seeded" (the fixed parts, Uni-LoRA's index vector or VeRA's matrices, are
    # drawn from `seed`; the file holds the trained tensors only) or "stored" (the file holds the
    # fixed parts too: adapters converted from PEFT, whose parts come from torch's RNG)
    fixed_parts: str = "seeded"
    init_scale: float = 0.02
    # VB-LoRA
    num_vectors: int = 90
    vector_length: int | None = None  # None: the largest b <= 256 dividing every adapted dimension
    topk: int = 2
    selection: str = "topk"
    gumbel_tau: float = 1.0 / 3.0
    noise_std: float = 0.1
    store: str = "topk"  # VB-LoRA adapter file: "topk" (indices + k-1 weights) or "logits" (exact resume)
    # VeRA
    vera_d_init: float = 0.1
    # TinyLoRA (PEFT's names): length of each trained vector v, and how many layers share one
    # (0: one v per layer; 1: one v for the whole model)
    u: int = 64
    weight_tying: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise UniLoraError(message)

        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or 2**62)
            need(ok, f"{name} must be an integer {f'in [{low}, {high}]' if high else f'>= {low}'}, got {value!r}")

        def number(name: str, low: float, high: float = math.inf, open_low: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if open_low else value >= low) and value <= high
            need(ok, f"{name} must be a finite number {'>' if open_low else '>='} {low}"
                     f"{'' if high == math.inf else f' and <= {high}'}, got {value!r}")

        need(isinstance(self.method, str) and self.method in method_names(),
             f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        integer("rank", 1, 2**20)
        integer("seed", 0, 2**63 - 1)
        need(self.alpha is None or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                    and math.isfinite(self.alpha) and self.alpha > 0),
             f"alpha must be a positive number or None, got {self.alpha!r}")
        number("dropout", 0.0, 0.999999)
        need(
            (isinstance(self.target_modules, str) and bool(self.target_modules))
            or (isinstance(self.target_modules, (list, tuple)) and bool(self.target_modules)
                and all(isinstance(t, str) and t for t in self.target_modules)),
            "target_modules must be a non-empty list of name suffixes, a regex string, or 'all-linear'",
        )
        need(isinstance(self.modules_to_save, (list, tuple)) and all(isinstance(m, str) and m for m in self.modules_to_save),
             f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        integer("theta_dim", 1)
        need(isinstance(self.init, str) and self.init in UNILORA_INITS, f"init must be one of {UNILORA_INITS}, got {self.init!r}")
        need(self.init != "zero_delta" or self.theta_dim >= 2,
             "init='zero_delta' needs theta_dim >= 2 (one slot pool for A, one for B)")
        number("init_scale", 0.0)
        need(isinstance(self.fixed_parts, str) and self.fixed_parts in ("seeded", "stored"),
             f"fixed_parts must be 'seeded' or 'stored', got {self.fixed_parts!r}")
        integer("num_vectors", 1, 2**31 - 1)
        if self.vector_length is not None:
            integer("vector_length", 1, 2**31 - 1)
        integer("topk", 1, 2**31 - 1)
        need(self.topk <= self.num_vectors, f"topk must be between 1 and num_vectors={self.num_vectors}, got {self.topk}")
        need(isinstance(self.selection, str) and self.selection in VBLORA_SELECTIONS,
             f"selection must be one of {', '.join(VBLORA_SELECTIONS)}, got {self.selection!r}")
        need(isinstance(self.store, str) and self.store in ("topk", "logits"), f"store must be 'topk' or 'logits', got {self.store!r}")
        number("gumbel_tau", 0.0, open_low=True)
        number("noise_std", 0.0)
        number("vera_d_init", -math.inf)
        integer("u", 1, 2**20)
        number("weight_tying", 0.0, 1.0)
        if self.method == "vblora":
            need(
                not (self.selection == "all" and self.store == "topk"),
                "selection='all' mixes every bank vector, so top-k indices cannot reproduce it: use store='logits'",
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, default in _LEFT_OUT_AT_DEFAULT.items():  # so that earlier versions read these adapters
            if data[key] == default:
                del data[key]
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise UniLoraError(f"an adapter config must be a JSON object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UniLoraError(f"unknown adapter config keys {unknown}; this unilora version knows {sorted(known)}")
        return cls(**data)
