"""The check every tensor read from disk or converted passes: finite values only."""

from __future__ import annotations

import torch

from .errors import UniLoraError


def check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UniLoraError(f"{where}: tensor '{name}' holds {bad:,} NaN or infinite values; {fix}")
