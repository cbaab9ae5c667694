"""Hands every adapted layer its (A, Bᵀ) from one reconstruction per forward pass.

The wrapped model's root module calls `begin_forward` (a forward pre-hook) and `end_forward`.
While gradients are on, each root forward reconstructs once and all layers share the result.
Without gradients (eval, generation) the factors are cached until a trainable tensor changes
(tracked by torch's in-place version counters), so generating many tokens reconstructs once.
A layer called outside a root forward (a sub-block run directly) checks the versions itself.
"""

from __future__ import annotations

import torch

from .methods import Projection


class FactorBinder:
    def __init__(self, projection: Projection):
        self.projection = projection
        self.enabled = True
        self._factors: list | None = None
        self._key: tuple | None = None
        self._depth = 0

    def _state_key(self) -> tuple:
        return (
            torch.is_grad_enabled(),
            self.projection.training,
            tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in self.projection.parameters()),
        )

    def _rebuild(self, key: tuple) -> None:
        self._factors = self.projection.layer_factors()
        self._key = key

    def begin_forward(self) -> None:
        self._depth += 1
        if self._depth > 1 or not self.enabled:
            return
        key = self._state_key()
        grad_and_trainable = key[0] and any(p.requires_grad for p in self.projection.parameters())
        if grad_and_trainable or key != self._key:
            self._rebuild(key)

    def end_forward(self) -> None:
        self._depth = max(0, self._depth - 1)

    def factors(self, slot: int):
        """The slot's (A, Bᵀ), or its ScaledFactors (see Projection.layer_factors)."""
        if self._depth == 0:
            key = self._state_key()
            if key != self._key:
                self._rebuild(key)
        elif self._factors is None:
            self._rebuild(self._state_key())
        return self._factors[slot]

    def invalidate(self) -> None:
        self._factors = None
        self._key = None
