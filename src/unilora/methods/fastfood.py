"""Fastfood (intrinsic dimension, Aghajanyan et al. 2020): θ_D = c · (H G Π H S θ_d)[:D].

θ_d is zero-padded to L = 2^ceil(log2 D); S: random signs, H: Walsh-Hadamard (unnormalised),
Π: permutation, G: Gaussian diagonal, c = 1 / (sqrt(L) · ||G||) so every column of P has unit
norm before truncation to D rows. O(L log L) time, nothing of size D × d is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.config import Integer, MethodOptions, Number, option
from ..core.errors import UniLoraError
from ..core.registry import register_method
from ..core.rng import SeededStream
from .base import Projection, Recipe, TrainedVector, shared_fixed_parts


@dataclass
class FastfoodOptions(MethodOptions):
    theta_dim: int = option(23040, Integer(1), "length d of the trained vector θ_d")
    init_scale: float = option(0.02, Number(0.0))  # θ_d ~ U(-s, s): not zero, A and B both come from it


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of a 1-D tensor whose length is a power of 2."""
    n = x.shape[-1]
    h = 1
    while h < n:
        pairs = x.view(n // (2 * h), 2, h)
        x = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).view(n)
        h *= 2
    return x


@register_method
class FastfoodProjection(Projection):
    method = "fastfood"
    summary = "one vector θ_d mapped by a seeded Fastfood transform (signs, Hadamard, permutation, Gaussian); θ_d and the seed are stored"
    options = FastfoodOptions
    vector = TrainedVector("theta_d", "fastfood.theta_d", "theta")
    # rate not tuned
    recipe = Recipe(defaults=dict(rank=4, theta_dim=9000), group_lrs={"theta": 5e-3},
                    paper=dict(rank=4, theta_dim=23040))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        D, d = layout.D, config.theta_dim
        if d > D:
            raise UniLoraError(f"theta_dim d={d} exceeds D={D}; choose d <= {D}")
        self.padded = 1 << max(0, math.ceil(math.log2(D)))
        L = self.padded
        def draw() -> dict:
            gauss = SeededStream(config.seed, "fastfood-gauss").normal(L)
            return dict(
                signs=torch.from_numpy(SeededStream(config.seed, "fastfood-signs").signs(L)).float(),
                permutation=torch.from_numpy(SeededStream(config.seed, "fastfood-permutation").permutation(L)),
                gauss=torch.from_numpy(gauss).float(),
                summary=[round(float(gauss.sum()), 6)] + [round(float(g), 6) for g in gauss[:4]],
                norm=float(np.linalg.norm(gauss)),
            )

        self.fixed = shared_fixed_parts(("fastfood", config.seed, L), draw)
        self._gauss_summary = list(self.fixed.summary)
        self.register_buffer("signs", self.fixed.signs, persistent=False)
        self.register_buffer("permutation", self.fixed.permutation, persistent=False)
        self.register_buffer("gauss", self.fixed.gauss, persistent=False)
        self.scale = 1.0 / (math.sqrt(L) * self.fixed.norm)
        generator = torch.Generator().manual_seed(config.seed)
        # Not zero: A and B both come from θ_d, so θ_d = 0 would give zero gradients.
        s = config.init_scale
        self.theta_d = nn.Parameter(torch.rand(d, generator=generator) * 2 * s - s)

    def factors_from(self, theta):
        x = torch.nn.functional.pad(theta, (0, self.padded - theta.shape[0])) * self.signs
        x = fwht(x)[self.permutation] * self.gauss
        flat = fwht(x)[: self.layout.D] * self.scale
        return self.layout.split(flat)

    @classmethod
    def vector_length(cls, layout, config):
        return config.theta_dim

    @classmethod
    def build_bytes(cls, layout, config):
        padded = 1 << max(0, (layout.D - 1).bit_length())
        return 64 * padded  # signs, permutation, Gaussian (numpy and torch), FWHT temporaries

    def metadata(self):
        return {"padded_length": self.padded, "gauss_summary": self._gauss_summary}

    def check_metadata(self, saved):
        summary = saved.get("gauss_summary")
        if not (isinstance(summary, list) and len(summary) == 5
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in summary)):
            raise UniLoraError("fastfood adapter config lacks a valid 'gauss_summary' under 'projection' "
                               "(the check of its seeded Gaussian diagonal); re-save it with this unilora version")
        super().check_metadata({**saved, "gauss_summary": self._gauss_summary})
        # The Gaussian diagonal may differ by an ulp across platforms: compare with a tolerance.
        if "gauss_summary" in saved and not np.allclose(saved["gauss_summary"], self._gauss_summary, rtol=1e-5, atol=1e-5):
            raise UniLoraError("fastfood adapter's seeded Gaussian diagonal does not match this install's; cannot load")
