"""The flattened LoRA parameter space θ_D: which layers, in which order, with which shapes.

θ_D is the concatenation, layer by layer in model order, of A (r × in, row-major) and then B
stored column-major, i.e. Bᵀ (r × out, row-major). Every one of the 2r rank-one component
vectors of a layer (a row of A, a column of B) is therefore contiguous, which is what VB-LoRA's
sub-vector division works on. The layout is part of every adapter file: a model whose adapted
layers differ cannot load the adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LayoutMismatchError


@dataclass(frozen=True)
class Slot:
    """One adapted layer: ΔW (out × in) = Bᵀᵀ A with A: r × in and Bᵀ: r × out."""

    name: str
    in_features: int
    out_features: int
    rank: int

    @property
    def a_numel(self) -> int:
        return self.rank * self.in_features

    @property
    def b_numel(self) -> int:
        return self.rank * self.out_features


class Layout:
    def __init__(self, slots: list[Slot]):
        if not slots:
            raise ValueError("a layout needs at least one adapted layer")
        self.slots = tuple(slots)
        self.sizes = [n for s in self.slots for n in (s.a_numel, s.b_numel)]
        self.D = int(sum(self.sizes))

    def __len__(self) -> int:
        return len(self.slots)

    def split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of θ_D as per-layer (A, Bᵀ); one split, no copies."""
        parts = torch.split(flat, self.sizes)
        return [
            (parts[2 * i].view(s.rank, s.in_features), parts[2 * i + 1].view(s.rank, s.out_features))
            for i, s in enumerate(self.slots)
        ]

    def b_entry_mask(self) -> np.ndarray:
        """Boolean mask over θ_D: True where the entry belongs to a B matrix."""
        mask = np.zeros(self.D, dtype=bool)
        offset = 0
        for s in self.slots:
            offset += s.a_numel
            mask[offset : offset + s.b_numel] = True
            offset += s.b_numel
        return mask

    def to_json(self) -> list[list]:
        return [[s.name, s.in_features, s.out_features, s.rank] for s in self.slots]

    @classmethod
    def from_json(cls, rows: list[list]) -> "Layout":
        return cls([Slot(str(n), int(i), int(o), int(r)) for n, i, o, r in rows])

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_json(), separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def require_same(self, expected: "Layout") -> None:
        """Raise a LayoutMismatchError naming the first difference."""
        if self.to_json() == expected.to_json():
            return
        if len(self) != len(expected):
            detail = f"the adapter has {len(expected)} adapted layers, this model has {len(self)}"
        else:
            mine, theirs = next(
                (a, b) for a, b in zip(self.slots, expected.slots) if a != b
            )
            detail = (
                f"adapter layer '{theirs.name}' ({theirs.out_features}x{theirs.in_features}, r={theirs.rank}) "
                f"vs model layer '{mine.name}' ({mine.out_features}x{mine.in_features}, r={mine.rank})"
            )
        raise LayoutMismatchError(
            f"adapter does not fit this model: {detail} (D={expected.D} vs {self.D}); "
            "load it onto the same base model architecture it was trained on"
        )
