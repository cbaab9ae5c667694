"""LoRA-XS (Bałazy et al., 2024): ΔW_l = U_r Σ_r R_l V_rᵀ, with U_r, Σ_r, V_r from the truncated SVD of
the frozen W_l and one trained r × r matrix R_l per layer (r² parameters per layer).

θ_d = concat over layers of R_l (row-major); θ_D is affine in θ_d: A_l = V_rᵀ is frozen and
Bᵀ_l = R_lᵀ Σ_r U_rᵀ is linear in R_l. R starts at zero (ΔW = 0 at step 0; the gradient reaches R
through the frozen factors). The file holds R and a fingerprint of the SVD (methods/svd.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.registry import register_method
from .base import Recipe, TrainedVector
from .svd import SVDProjection


@register_method
class LoRAXSProjection(SVDProjection):
    method = "lora_xs"
    summary = "frozen factors from each layer's truncated SVD; one trained r x r matrix per layer is stored"
    vector = TrainedVector("weights", "lora_xs.cores", "cores")
    # rank 8 (64 numbers a layer). Rate: the best of scripts/svd_results.py --tune (seed 0, Rotten Tomatoes 2,000 x 2
    # epochs): 1e-3 74.49, 3e-3 75.43, 1e-2 76.19, 3e-2 74.83.
    # `unilora count`'s default: r = 2 (the paper has no single setting; it scales r from 1 parameter per layer up)
    recipe = Recipe(defaults=dict(rank=8), group_lrs={"cores": 1e-2}, paper=dict(rank=2))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        r = config.rank
        self.weights = nn.Parameter(torch.zeros(len(layout) * r * r))

    def cores(self, theta):
        r = self.config.rank
        return theta.view(len(self.layout), r, r)

    @classmethod
    def vector_length(cls, layout, config):
        return len(layout) * config.rank**2
