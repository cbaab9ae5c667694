"""The common shape of every method: a projection from trainable θ_d to θ_D = P θ_d."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.layout import Layout


class ScaledFactors(NamedTuple):
    """A layer's factors as frozen matrices plus trainable vectors: A_l = diag(d) A, Bᵀ_l = Bᵀ diag(b).

    Layers apply the vectors to activations instead of forming A_l and Bᵀ_l, so backward never
    computes a weight gradient for the frozen A, Bᵀ (VeRA at rank 256 would pay a full matmul).
    """

    a: torch.Tensor  # (r, in), frozen
    d: torch.Tensor  # (r,)
    bt: torch.Tensor  # (r, out), frozen
    b: torch.Tensor  # (out,)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d.unsqueeze(1) * self.a, self.bt * self.b


class FixedParts:
    """The seeded, never-trained tensors of a projection (Uni-LoRA's index vector and scales,
    VeRA's matrices, Fastfood's transform) and what was derived from the draw."""

    def __init__(self, **values):
        self.__dict__.update(values)


_FIXED_PARTS: "weakref.WeakValueDictionary[tuple, FixedParts]" = weakref.WeakValueDictionary()
_FIXED_PARTS_LOCK = threading.Lock()


def shared_fixed_parts(key: tuple, draw: Callable[[], dict]) -> FixedParts:
    """Draw the fixed parts for `key` once while any projection holds them: adapters of the same
    method, layout and seed then share one copy (an extra adapter costs its trained tensors only).
    Every projection registers these same tensors as its buffers and never writes into them."""
    with _FIXED_PARTS_LOCK:
        parts = _FIXED_PARTS.get(key)
        if parts is None:
            parts = FixedParts(**draw())
            _FIXED_PARTS[key] = parts
        return parts


class Projection(nn.Module):
    """Owns every shared tensor of one adapter and rebuilds all layers' (A, Bᵀ) in one call.

    Subclasses implement `factors_from(theta)`, the fast path. `theta` is the method's main
    trainable tensor (θ_d); `project(theta)` flattens the result to θ_D for checks against a
    dense P. Stored tensors are what an adapter file holds; they may differ from the
    trainable ones (VB-LoRA keeps top-k indices instead of logits).
    """

    method: str = ""
    stochastic: bool = False  # a training-mode reconstruction that samples (VB-LoRA's noisy / Gumbel selection)

    def __init__(self, layout: Layout, config: AdapterConfig):
        super().__init__()
        self.layout = layout
        self.config = config

    # --- the projection -------------------------------------------------------------
    @property
    def theta(self) -> torch.Tensor:
        raise NotImplementedError

    def factors_from(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.factors_from(self.theta)

    def eval_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The deterministic (eval-mode) factors, without gradients: what merge and export use."""
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad():
                return self.factors()
        finally:
            self.train(was_training)

    def layer_factors(self) -> list:
        """What the adapted layers use in forward: (A, Bᵀ) pairs, or ScaledFactors per layer."""
        return self.factors()

    def forward(self) -> torch.Tensor:
        """θ_D for the current parameters (lets torch.func.functional_call swap them in tests)."""
        return self.project(self.theta)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """θ_D for a given θ_d (flattened A, Bᵀ of every layer)."""
        return torch.cat([t.reshape(-1) for pair in self.factors_from(theta) for t in pair])

    # --- training -------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups of trainable parameters, for separate learning rates."""
        raise NotImplementedError

    # --- storage --------------------------------------------------------------------
    @classmethod
    def stored_spec(cls, layout: Layout, config: AdapterConfig) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, "float" or "index") of every tensor an adapter file of this method holds;
        checked against the file's header before anything is loaded or built."""
        raise NotImplementedError

    @classmethod
    def build_bytes(cls, layout: Layout, config: AdapterConfig) -> int:
        """Bytes that building the projection and one reconstruction allocate (checked against the
        memory available before building from a file)."""
        return 8 * layout.D

    @classmethod
    def check_stored_values(cls, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
        """Method-specific value checks beyond finiteness (VB-LoRA's indices and weights)."""

    def stored_tensors(self, store: str | None = None) -> dict[str, torch.Tensor]:
        """What an adapter file holds (`store` matters to VB-LoRA only)."""
        raise NotImplementedError

    def load_stored_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def stored_param_count(self) -> int:
        """Float32-equivalent stored parameters (seed 003 §3.4 accounting)."""
        return sum(t.numel() for t in self.stored_tensors().values())

    def metadata(self) -> dict:
        """JSON-able facts that must match on reload (e.g. a checksum of a seeded draw)."""
        return {}

    def check_metadata(self, saved: dict) -> None:
        mine = self.metadata()
        missing = sorted(set(mine) - set(saved))
        if missing:
            raise UniLoraError(
                f"{self.method} adapter config lacks {missing} under 'projection': without the checksum of its "
                "seeded draw it cannot be verified; re-save the adapter with this unilora version"
            )
        for key, value in saved.items():
            if mine.get(key) != value:
                raise UniLoraError(
                    f"{self.method} adapter was saved with {key}={value!r} but this install rebuilds "
                    f"{mine.get(key)!r}; the seeded projection differs, so the adapter cannot be used here"
                )

    # --- helpers --------------------------------------------------------------------
    def _require_tensors(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UniLoraError(f"{self.method} adapter file lacks tensors {missing}; the file is incomplete or not a {self.method} adapter")

    def _copy_into(self, param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise UniLoraError(
                f"adapter tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
