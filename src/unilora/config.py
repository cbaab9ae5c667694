"""AdapterConfig: every hyperparameter of every method, validated up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import UniLoraError

METHODS = ("lora", "vera", "tied_lora", "vblora", "unilora", "fastfood")
VBLORA_SELECTIONS = ("topk", "all", "noisy_topk", "gumbel", "st_gumbel")
UNILORA_INITS = ("uniform", "zero_delta")


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
    init_scale: float = 0.02
    # VB-LoRA
    num_vectors: int = 90
    vector_length: int = 256
    topk: int = 2
    selection: str = "topk"
    gumbel_tau: float = 1.0 / 3.0
    noise_std: float = 0.1
    store: str = "topk"  # VB-LoRA adapter file: "topk" (indices + k-1 weights) or "logits" (exact resume)
    # VeRA
    vera_d_init: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise UniLoraError(message)

        need(self.method in METHODS, f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        need(isinstance(self.rank, int) and self.rank >= 1, f"rank must be a positive integer, got {self.rank!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(
            isinstance(self.target_modules, str) or (isinstance(self.target_modules, (list, tuple)) and self.target_modules),
            "target_modules must be a non-empty list of name suffixes, a regex string, or 'all-linear'",
        )
        if self.method in ("unilora", "fastfood"):
            need(self.theta_dim >= 1, f"theta_dim must be >= 1, got {self.theta_dim}")
            need(self.init in UNILORA_INITS, f"init must be one of {UNILORA_INITS}, got '{self.init}'")
        if self.method == "vblora":
            need(self.num_vectors >= 1, f"num_vectors (h) must be >= 1, got {self.num_vectors}")
            need(self.vector_length >= 1, f"vector_length (b) must be >= 1, got {self.vector_length}")
            need(
                1 <= self.topk <= self.num_vectors,
                f"topk must be between 1 and num_vectors={self.num_vectors}, got {self.topk}",
            )
            need(
                self.selection in VBLORA_SELECTIONS,
                f"selection must be one of {', '.join(VBLORA_SELECTIONS)}, got '{self.selection}'",
            )
            need(self.store in ("topk", "logits"), f"store must be 'topk' or 'logits', got '{self.store}'")
            need(
                not (self.selection == "all" and self.store == "topk"),
                "selection='all' mixes every bank vector, so top-k indices cannot reproduce it: use store='logits'",
            )
            need(self.gumbel_tau > 0, f"gumbel_tau must be > 0, got {self.gumbel_tau}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UniLoraError(f"unknown adapter config keys {unknown}; this unilora version knows {sorted(known)}")
        return cls(**data)
