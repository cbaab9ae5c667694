"""VeRA: frozen shared random A, B (sliced to each layer's shape); only scaling vectors train.

ΔW_l = diag(b_l) B diag(d_l) A, i.e. A_l = diag(d_l) A[:, :in_l] and Bᵀ_l = Bᵀ[:, :out_l] diag(b_l).
θ_d = concat over layers of (d_l (r), b_l (out_l)): linear, so P is a fixed sparse matrix.
The frozen matrices come from the seed and are never stored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Choice, MethodOptions, Number, option
from ..core.errors import UniLoraError
from ..core.layout import Slot
from ..core.registry import register_method
from ..core.rng import SeededStream
from ..core.targeting import base_module, linear_shape
from .base import Projection, Recipe, ScaledFactors, TrainedVector, copy_into, shared_fixed_parts
from .peft_format import PeftReading, layer_key, shared_key


@dataclass
class VeRAOptions(MethodOptions):
    # "seeded": the shared matrices are drawn from `seed` and never stored; "stored": the file holds
    # them (adapters converted from PEFT, whose matrices come from torch's RNG)
    fixed_parts: str = option("seeded", Choice(("seeded", "stored")))
    vera_d_init: float = option(0.1, Number())  # the initial value of every d_l
    left_out_at_default = ("fixed_parts",)


def _seeded_uniform(seed: int, name: str, shape: tuple[int, int], bound: float) -> torch.Tensor:
    values = SeededStream(seed, name).uniform(shape[0] * shape[1]) * 2 * bound - bound
    return torch.from_numpy(values.reshape(shape)).to(torch.float32)


@register_method
class VeRAProjection(Projection):
    method = "vera"
    summary = "frozen seeded random A, B shared by all layers; per-layer scaling vectors train and are stored"
    options = VeRAOptions
    vector = TrainedVector("scales", "vera.scales", "scales")
    peft_type = "VERA"
    peft_needs_model = "shapes"  # PEFT's files do not record each layer's input size and order
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
    def vector_length(cls, layout, config):
        return sum(s.rank + s.out_features for s in layout.slots)

    @classmethod
    def fixed_spec(cls, layout, config):
        if config.fixed_parts != "stored":
            return {}
        r = config.rank
        return {"vera.shared_a": ((r, max(s.in_features for s in layout.slots)), "float"),
                "vera.shared_bt": ((r, max(s.out_features for s in layout.slots)), "float")}

    @classmethod
    def build_bytes(cls, layout, config):
        r = config.rank
        shared = r * (max(s.in_features for s in layout.slots) + max(s.out_features for s in layout.slots))
        return 24 * shared + 8 * layout.D  # float64 draw + float32 copies; dense factors for merging

    def stored_fixed_tensors(self):
        if self.config.fixed_parts != "stored":
            return {}
        return {"vera.shared_a": self.shared_a, "vera.shared_bt": self.shared_bt}

    def load_fixed_tensors(self, tensors):
        if self.config.fixed_parts == "stored":
            copy_into(self.shared_a, tensors["vera.shared_a"], "vera.shared_a")
            copy_into(self.shared_bt, tensors["vera.shared_bt"], "vera.shared_bt")

    def metadata(self):
        return {} if self._digest is None else {"shared_sha256": self._digest}

    # --- PEFT's VERA ---------------------------------------------------------------------
    # Our shared A, Bᵀ as `vera_A` (r × max in) and `vera_B` (max out × r); each layer's d and b as
    # `lambda_d` and `lambda_b` (the scaling folded into `lambda_b`). PEFT would redraw the matrices from
    # torch's RNG: the directory stores ours (`save_projection`).
    def peft_state(self, names, save_projection=True):
        state = {shared_key("vera_A"): self.shared_a.clone(), shared_key("vera_B"): self.shared_bt.t().contiguous()}
        for name, factors in zip(names, self.layer_factors()):
            state[layer_key(name, "vera_lambda_d")] = factors.d.detach().clone()
            state[layer_key(name, "vera_lambda_b")] = (factors.b.detach() * self.config.scaling).clone()
        return state

    def peft_config(self, save_projection=True):
        return {"projection_prng_key": self.config.seed, "save_projection": True, "vera_dropout": 0.0,
                "d_initial": self.config.vera_d_init, "init_weights": True}

    @classmethod
    def from_peft(cls, source):
        """A directory saved with `save_projection=True` (its matrices are kept: fixed_parts="stored").
        PEFT does not record each layer's input size: the base model (`source.model`) gives them."""
        (r,) = source.integers("r")
        modules = source.modules("vera_lambda_d")
        shape_a, shape_b = source.shape(shared_key("vera_A")), source.shape(shared_key("vera_B"))
        if not modules or shape_a is None or shape_b is None:
            raise UniLoraError(f"'{source.weights}' holds no VeRA matrices: PEFT saved it without save_projection=True "
                               "and would redraw them from torch's RNG; re-save it with save_projection=True to "
                               "convert it exactly")
        modules = source.model_order(set(modules), "VERA")
        slots = []
        for name in modules:
            n_in, n_out = linear_shape(base_module(source.model, name))
            if source.shape(layer_key(name, "vera_lambda_d")) != (r,) \
                    or source.shape(layer_key(name, "vera_lambda_b")) != (n_out,):
                raise UniLoraError(f"'{source.weights}': the vectors of '{name}' do not fit r={r} and the model's "
                                   f"{n_out} outputs; give the model the adapter was trained on")
            slots.append(Slot(name, n_in, n_out, r))
        expected = ((r, max(s.in_features for s in slots)), (max(s.out_features for s in slots), r))
        if (shape_a, shape_b) != expected:
            raise UniLoraError(f"'{source.weights}': vera_A / vera_B have shapes {shape_a}, {shape_b}; these layers "
                               f"need {expected}")
        scales = [source.tensor(layer_key(name, f"vera_lambda_{part}")) for name in modules for part in ("d", "b")]
        options = dict(method=cls.method, rank=r, fixed_parts="stored",
                       seed=int(source.config.get("projection_prng_key") or 0),
                       vera_d_init=float(source.config.get("d_initial", 0.1)))
        tensors = {"vera.scales": torch.cat(scales), "vera.shared_a": source.tensor(shared_key("vera_A")),
                   "vera.shared_bt": source.tensor(shared_key("vera_B")).t().contiguous()}
        return PeftReading(slots, options, tensors)
