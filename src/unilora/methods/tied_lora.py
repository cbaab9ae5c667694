"""Tied-LoRA: one trainable A, B per layer shape, shared by all layers of that shape, plus
per-layer scaling vectors: ΔW_l = diag(v_l) B diag(u_l) A.

θ_d here is the scaling vectors concat(u_l (r), v_l (out_l)); given the shared A, B the map
θ_d -> θ_D is linear (that is the P the tests check). A and B train too and are stored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.registry import register_method
from .base import Projection, Recipe, copy_into


@register_method
class TiedLoRAProjection(Projection):
    method = "tied_lora"
    summary = "one A, B per layer shape, shared by the layers of that shape, plus per-layer scaling vectors; all train and are stored"
    # rates not tuned
    recipe = Recipe(defaults=dict(rank=8), group_lrs={"shared": 1e-3, "scales": 1e-2}, paper=dict(rank=8))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        generator = torch.Generator().manual_seed(config.seed)
        shapes = self._shapes(layout)
        self.group_of = [shapes.index((s.in_features, s.out_features)) for s in layout.slots]
        r = config.rank
        self.shared_a = nn.ParameterList()
        self.shared_bt = nn.ParameterList()
        for n_in, n_out in shapes:
            bound = 1.0 / math.sqrt(n_in)
            self.shared_a.append(nn.Parameter(torch.rand(r, n_in, generator=generator) * 2 * bound - bound))
            self.shared_bt.append(nn.Parameter(torch.zeros(r, n_out)))  # B = 0: ΔW = 0 at step 0
        self.sizes = [n for s in layout.slots for n in (s.rank, s.out_features)]
        self.scales = nn.Parameter(torch.ones(sum(self.sizes)))

    @property
    def theta(self):
        return self.scales

    def factors_from(self, theta):
        parts = torch.split(theta, self.sizes)
        return [
            (parts[2 * i].unsqueeze(1) * self.shared_a[g], self.shared_bt[g] * parts[2 * i + 1])
            for i, g in enumerate(self.group_of)
        ]

    @staticmethod
    def _shapes(layout):
        return sorted({(s.in_features, s.out_features) for s in layout.slots})

    @classmethod
    def stored_spec(cls, layout, config):
        r = config.rank
        spec = {"tied_lora.scales": ((sum(s.rank + s.out_features for s in layout.slots),), "float")}
        for g, (n_in, n_out) in enumerate(cls._shapes(layout)):
            spec[f"tied_lora.shared_a.{g}"] = ((r, n_in), "float")
            spec[f"tied_lora.shared_bt.{g}"] = ((r, n_out), "float")
        return spec

    @classmethod
    def build_bytes(cls, layout, config):
        return 8 * layout.D + 8 * config.rank * sum(i + o for i, o in cls._shapes(layout))

    def param_groups(self):
        return {"shared": [*self.shared_a, *self.shared_bt], "scales": [self.scales]}

    def stored_tensors(self, store=None):
        tensors = {"tied_lora.scales": self.scales.detach()}
        for g, (a, bt) in enumerate(zip(self.shared_a, self.shared_bt)):
            tensors[f"tied_lora.shared_a.{g}"] = a.detach()
            tensors[f"tied_lora.shared_bt.{g}"] = bt.detach()
        return tensors

    def load_stored_tensors(self, tensors):
        names = list(self.stored_tensors())
        self._require_tensors(tensors, names)
        copy_into(self.scales, tensors["tied_lora.scales"], "tied_lora.scales")
        for g, (a, bt) in enumerate(zip(self.shared_a, self.shared_bt)):
            copy_into(a, tensors[f"tied_lora.shared_a.{g}"], f"tied_lora.shared_a.{g}")
            copy_into(bt, tensors[f"tied_lora.shared_bt.{g}"], f"tied_lora.shared_bt.{g}")
