"""A causal-LM teacher's next-token distributions, kept so that they are computed once.

A frozen teacher without dropout gives the same distribution for a text every time: for a
training text every epoch, for a held-out text at every evaluation. A classifier's logits are a
few numbers per text and are kept as they are (distill.DistillTask). An LM's are vocabulary-sized
at every position that carries a loss (49,152 per token for SmolLM2): kept here as float16
log-probabilities, 96 KiB per position, up to a budget; past it a text's are recomputed when it
comes again. Not kept sparse: at the distillation temperature (2) the SmolLM2 teacher's top 4,096
tokens hold only about 70 % of the mass on BBC headlines (top 64: 25 %), and a top-64 cache with
the rest in one outcome cost the students 1.8 and 2.3 points of the kept gain (docs/results.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CACHE_BUDGET_BYTES = 2 << 30  # per cache (training texts, held-out texts)


def stored(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities at `temperature`, in float16: ~1e-3 relative rounding of each one. They
    are renormalised when read (log_softmax), so the rounding does not leave mass missing."""
    return F.log_softmax(logits.float() / temperature, -1).to(torch.float16)


class TeacherCache:
    """Tensors by key (a text's index, or an evaluation batch's), up to `budget` bytes: a tensor
    that does not fit is not kept, and its key stays missing."""

    def __init__(self, budget: int = CACHE_BUDGET_BYTES):
        self.budget, self.used, self.entries = budget, 0, {}

    def missing(self, keys) -> list:
        return [k for k in keys if k not in self.entries]

    def add(self, key, value: torch.Tensor) -> bool:
        if self.used + value.nbytes > self.budget:
            return False
        self.entries[key] = value
        self.used += value.nbytes
        return True

    def get(self, key) -> torch.Tensor:
        return self.entries[key]
