"""VeRA: frozen shared random A, B (sliced to each layer's shape); only scaling vectors train.

ΔW_l = diag(b_l) B diag(d_l) A, i.e. A_l = diag(d_l) A[:, :in_l] and Bᵀ_l = Bᵀ[:, :out_l] diag(b_l).
θ_d = concat over layers of (d_l (r), b_l (out_l)): linear, so P is a fixed sparse matrix.
The frozen matrices come from the seed and are never stored.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..core.registry import register_method
from ..core.rng import SeededStream
from .base import Projection, Recipe, ScaledFactors, copy_into, shared_fixed_parts


def _seeded_uniform(seed: int, name: str, shape: tuple[int, int], bound: float) -> torch.Tensor:
    values = SeededStream(seed, name).uniform(shape[0] * shape[1]) * 2 * bound - bound
    return torch.from_numpy(values.reshape(shape)).to(torch.float32)


@register_method
class VeRAProjection(Projection):
    method = "vera"
    # rate: the best of the sweep (scripts/tune_rates.sh)
    recipe = Recipe(defaults=dict(rank=256), group_lrs={"scales": 3e-2}, paper=dict(rank=1024))

    def __init__(self, layout, config):
        super().__init__(layout, config)
        r = config.rank
        max_in = max(s.in_features for s in layout.slots)
        max_out = max(s.out_features for s in layout.slots)

        def draw() -> dict:
            # kaiming-uniform bounds for the shared matrices (fan-in of A is `in`, of B is r)
            shared_a = _seeded_uniform(config.seed, "vera-A", (r, max_in), math.sqrt(6.0 / max_in))
            shared_bt = _seeded_uniform(config.seed, "vera-B", (r, max_out), math.sqrt(6.0 / r))
            digest = hashlib.sha256(shared_a.numpy().tobytes() + shared_bt.numpy().tobytes()).hexdigest()[:16]
            return dict(shared_a=shared_a, shared_bt=shared_bt, digest=digest)

        if config.fixed_parts == "stored":  # filled by load_stored_tensors (adapters converted from PEFT)
            self.fixed, self._digest = None, None
            self.register_buffer("shared_a", torch.zeros(r, max_in), persistent=False)
            self.register_buffer("shared_bt", torch.zeros(r, max_out), persistent=False)
        else:
            self.fixed = shared_fixed_parts(("vera", config.seed, r, max_in, max_out), draw)
            self._digest = self.fixed.digest
            self.register_buffer("shared_a", self.fixed.shared_a, persistent=False)
            self.register_buffer("shared_bt", self.fixed.shared_bt, persistent=False)
        self.sizes = [n for s in layout.slots for n in (s.rank, s.out_features)]
        init = torch.cat(
            [torch.cat([torch.full((s.rank,), config.vera_d_init), torch.zeros(s.out_features)]) for s in layout.slots]
        )
        self.scales = nn.Parameter(init)

    @property
    def theta(self):
        return self.scales

    def _scaled(self, theta) -> list[ScaledFactors]:
        parts = torch.split(theta, self.sizes)
        return [
            ScaledFactors(self.shared_a[:, : s.in_features], parts[2 * i], self.shared_bt[:, : s.out_features], parts[2 * i + 1])
            for i, s in enumerate(self.layout.slots)
        ]

    def factors_from(self, theta):
        return [f.dense() for f in self._scaled(theta)]

    def layer_factors(self):
        return self._scaled(self.theta)

    @classmethod
    def stored_spec(cls, layout, config):
        spec = {"vera.scales": ((sum(s.rank + s.out_features for s in layout.slots),), "float")}
        if config.fixed_parts == "stored":
            r = config.rank
            spec["vera.shared_a"] = ((r, max(s.in_features for s in layout.slots)), "float")
            spec["vera.shared_bt"] = ((r, max(s.out_features for s in layout.slots)), "float")
        return spec

    @classmethod
    def build_bytes(cls, layout, config):
        r = config.rank
        shared = r * (max(s.in_features for s in layout.slots) + max(s.out_features for s in layout.slots))
        return 24 * shared + 8 * layout.D  # float64 draw + float32 copies; dense factors for merging

    def param_groups(self):
        return {"scales": [self.scales]}

    def stored_tensors(self, store=None):
        tensors = {"vera.scales": self.scales.detach()}
        if self.config.fixed_parts == "stored":
            tensors.update({"vera.shared_a": self.shared_a, "vera.shared_bt": self.shared_bt})
        return tensors

    def load_stored_tensors(self, tensors):
        self._require_tensors(tensors, ["vera.scales"])
        copy_into(self.scales, tensors["vera.scales"], "vera.scales")
        if self.config.fixed_parts == "stored":
            self._require_tensors(tensors, ["vera.shared_a", "vera.shared_bt"])
            copy_into(self.shared_a, tensors["vera.shared_a"], "vera.shared_a")
            copy_into(self.shared_bt, tensors["vera.shared_bt"], "vera.shared_bt")

    def metadata(self):
        return {} if self._digest is None else {"shared_sha256": self._digest}
