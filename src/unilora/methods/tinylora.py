"""TinyLoRA ("Learning to Reason in 13 Parameters"; PEFT's TINYLORA): LoRA-XS with each layer's core
built from a tiny trained vector, R_l = Σ_i v_{g(l), i} P_{l, i}, and ΔW_l = U_r √Σ_r R_l √Σ_r V_rᵀ.

P_l (u × r × r) is fixed, drawn from N(0, 1/r) with torch's generator seeded by seed + l, exactly as
PEFT draws it (so PEFT rebuilds ours from `projection_seed` alone); a digest of the draw is recorded
and checked on reload. Layers share v by `weight_tying` as in PEFT: round(L (1 - weight_tying))
groups of consecutive layers (at least one), so weight_tying = 1 trains one vector of u numbers for
the whole model. θ_d = concat of the groups' v; θ_D is affine in θ_d (A_l frozen, Bᵀ_l linear in v).
√Σ on both sides, as PEFT puts it, so that conversion to and from PEFT is exact. v starts at zero.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.registry import register_method
from .base import Recipe, copy_into, shared_fixed_parts
from .svd import SVDProjection


def tying_groups(layers: int, weight_tying: float) -> list[int]:
    """The group of each layer (PEFT's rule): consecutive layers, the last group taking the rest."""
    groups = max(1, round(layers * (1.0 - weight_tying)))
    size = max(1, layers // groups)
    return [min(i // size, groups - 1) for i in range(layers)]


def draw_projections(layers: int, u: int, r: int, seed: int) -> torch.Tensor:
    """P (L × u × r × r): layer l's from torch.Generator seeded by seed + l, as PEFT draws them."""
    return torch.stack([torch.normal(0.0, 1.0 / r**0.5, size=(u, r, r), generator=torch.Generator().manual_seed(seed + l))
                        for l in range(layers)])


@register_method
class TinyLoRAProjection(SVDProjection):
    method = "tinylora"
    sqrt_split = True
    # r = 2, u = 64 and weight_tying 0 are PEFT's defaults. Rate: the best of scripts/svd_results.py --tune (seed 0,
    # Rotten Tomatoes 2,000 x 2 epochs): 1e-3 74.38, 3e-3 74.64, 1e-2 71.16, 3e-2 diverged (55.52, the majority class).
    # `unilora count`'s default: the title's 13 parameters (one v of u = 13 for the whole model) at r = 2
    recipe = Recipe(defaults=dict(rank=2, u=64), group_lrs={"v": 3e-3}, paper=dict(rank=2, u=13, weight_tying=1.0))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        L, u, r = len(layout), config.u, config.rank
        groups = tying_groups(L, config.weight_tying)
        self.register_buffer("group_of", torch.tensor(groups), persistent=False)
        if config.fixed_parts == "stored":  # filled by load_stored_tensors (adapters converted from PEFT)
            self.projections_digest = None
            self.register_buffer("projections", torch.zeros(L, u, r, r), persistent=False)
        else:
            def draw() -> dict:
                p = draw_projections(L, u, r, config.seed)
                return dict(p=p, digest=hashlib.sha256(p.numpy().tobytes()).hexdigest()[:16])

            seeded = shared_fixed_parts(("tinylora", L, u, r, config.seed), draw)
            self.seeded, self.projections_digest = seeded, seeded.digest
            self.register_buffer("projections", seeded.p, persistent=False)
        self.v = nn.Parameter(torch.zeros((max(groups) + 1) * u))

    @property
    def theta(self):
        return self.v

    def cores(self, theta):
        v = theta.view(-1, self.config.u)[self.group_of]  # (L, u)
        return torch.einsum("li,lijk->ljk", v, self.projections)

    @classmethod
    def stored_spec(cls, layout, config):
        L, r = len(layout), config.rank
        spec = {"tinylora.v": (((max(tying_groups(L, config.weight_tying)) + 1) * config.u,), "float")}
        if config.fixed_parts == "stored":
            spec["tinylora.projections"] = ((L, config.u, r, r), "float")
        return spec

    @classmethod
    def build_bytes(cls, layout, config):
        return super().build_bytes(layout, config) + 8 * len(layout) * config.u * config.rank**2

    def param_groups(self):
        return {"v": [self.v]}

    def stored_tensors(self, store=None):
        tensors = {"tinylora.v": self.v.detach()}
        if self.config.fixed_parts == "stored":
            tensors["tinylora.projections"] = self.projections
        return tensors

    def load_stored_tensors(self, tensors):
        self._require_tensors(tensors, ["tinylora.v"])
        copy_into(self.v, tensors["tinylora.v"], "tinylora.v")
        if self.config.fixed_parts == "stored":
            self._require_tensors(tensors, ["tinylora.projections"])
            copy_into(self.projections, tensors["tinylora.projections"], "tinylora.projections")

    def seeded_metadata(self):
        return {} if self.projections_digest is None else {"projections_sha256": self.projections_digest}
