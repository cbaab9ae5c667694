"""LoRA: P is the identity, θ_d = θ_D (one flat parameter, viewed as every layer's A and Bᵀ)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.registry import register_method
from .base import Projection, Recipe, TrainedVector


@register_method
class LoRAProjection(Projection):
    method = "lora"
    summary = "every layer's A and B train and are stored (P = identity)"
    vector = TrainedVector("weights", "lora.weights", "lora")
    # rate: the best of the sweep (scripts/tune_rates.sh); the next one up, 1e-2, diverged
    recipe = Recipe(defaults=dict(rank=8), group_lrs={"lora": 3e-3}, paper=dict(rank=8))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        flat = torch.zeros(layout.D)
        generator = torch.Generator().manual_seed(config.seed)
        # A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5), as nn.Linear); B = 0
        for (a, _), slot in zip(layout.split(flat), layout.slots):
            bound = 1.0 / math.sqrt(slot.in_features)
            a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
        self.weights = nn.Parameter(flat)

    def factors_from(self, theta):
        return self.layout.split(theta)

    @classmethod
    def vector_length(cls, layout, config):
        return layout.D

    @classmethod
    def build_bytes(cls, layout, config):
        return 12 * layout.D  # the parameter, an init buffer, a reconstruction

    def fit_to(self, target):
        with torch.no_grad():
            self.weights.copy_(target)
        return True
