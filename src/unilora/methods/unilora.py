"""Uni-LoRA: one global vector θ_d; each entry of θ_D reads one seeded slot of θ_d.

Row i of P has a single nonzero 1/sqrt(n_j) at column j(i), where n_j counts the entries tied
to slot j, so PᵀP = I. The draw is balanced (every slot gets floor(D/d) or ceil(D/d) entries,
then a seeded shuffle), so no slot is unused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.config import Choice, Integer, MethodOptions, Number, option
from ..core.errors import UniLoraError
from ..core.layout import Slot
from ..core.registry import register_method
from ..core.rng import SeededStream
from .base import Projection, Recipe, TrainedVector, copy_into, shared_fixed_parts
from .peft_format import PeftReading, layer_key, shared_key

INITS = ("uniform", "zero_delta")
FIXED_PARTS = ("seeded", "stored")


@dataclass
class UniLoRAOptions(MethodOptions):
    theta_dim: int = option(23040, Integer(1), "length d of the trained vector θ_d")
    init: str = option("uniform", Choice(INITS), "initialisation of θ_d: U(-s, s), or zero_delta (ΔW = 0 at step 0)")
    # "seeded": the index vector is drawn from `seed` and the file holds θ_d only; "stored": the file
    # holds the indices too (adapters converted from PEFT, whose indices come from torch's RNG)
    fixed_parts: str = option("seeded", Choice(FIXED_PARTS))
    init_scale: float = option(0.02, Number(0.0))
    left_out_at_default = ("fixed_parts",)

    def check(self, config):
        if self.init == "zero_delta" and self.theta_dim < 2:
            raise UniLoraError("init='zero_delta' needs theta_dim >= 2 (one slot pool for A, one for B)")


def balanced_assignment(D: int, d: int, seed: int, b_mask: np.ndarray | None = None) -> np.ndarray:
    """Slot index j(i) for every entry i of θ_D.

    With b_mask, A entries and B entries draw from disjoint slot pools (sized in proportion),
    so the B pool can start at zero while A does not: ΔW = 0 at step 0, yet gradients flow.
    """
    assignment = np.empty(D, dtype=np.int64)
    if b_mask is None:
        pools = [(np.arange(D), 0, d)]
    else:
        positions_b = np.flatnonzero(b_mask)
        positions_a = np.flatnonzero(~b_mask)
        d_a = min(max(1, round(d * len(positions_a) / D)), d - 1)
        pools = [(positions_a, 0, d_a), (positions_b, d_a, d - d_a)]
    for name, (positions, offset, size) in zip(("a", "b"), pools):
        slots = offset + np.arange(len(positions), dtype=np.int64) % size
        shuffle = SeededStream(seed, f"unilora-assignment-{name}").permutation(len(positions))
        assignment[positions[shuffle]] = slots
    return assignment


@register_method
class UniLoRAProjection(Projection):
    method = "unilora"
    summary = "one vector θ_d of length d trains; each entry of θ_D reads one seeded slot of it; θ_d and the seed are stored"
    options = UniLoRAOptions
    vector = TrainedVector("theta_d", "unilora.theta_d", "theta")
    peft_type = "UNILORA"
    # θ rate: the best of the sweep (scripts/tune_rates.sh; 4e-2 scored the same), tuned where each θ_d
    # entry feeds D/d = 165,888 / 9,000 = 18.4 LoRA weights (MiniLM, all linear, rank 4); other models
    # scale it by their D/d (training/recipes.fitted_group_lrs). A distilled classifier trains θ at 4e-2:
    # on seeds 5-7 it ended closer to the teacher in held-out KL in 6 of 6 runs; 8e-2 was further off
    # than 4e-2 on 3 of 3 Rotten Tomatoes seeds, 1e-2 further than 2e-2 (seed 5).
    recipe = Recipe(defaults=dict(rank=4, theta_dim=9000), group_lrs={"theta": 2e-2},
                    paper=dict(rank=4, theta_dim=23040), distill_group_lrs={"seq-cls": {"theta": 4e-2}},
                    tuned_sharing=165_888 / 9_000)

    def __init__(self, layout, config):
        super().__init__(layout, config)
        D, d = layout.D, config.theta_dim
        zero_delta = config.init == "zero_delta"
        if d > D:
            raise UniLoraError(f"theta_dim d={d} exceeds D={D} (the LoRA parameter count); choose d <= {D}")
        index_dtype = torch.int32 if D < 2**31 else torch.int64
        if config.fixed_parts == "stored":  # filled by load_stored_tensors (nothing to draw, nothing shared)
            self.fixed = None
            self._index_digest = None
            self.register_buffer("indices", torch.zeros(D, dtype=index_dtype), persistent=False)
            self.register_buffer("slot_scale", torch.zeros(d), persistent=False)
            self.theta_d = nn.Parameter(torch.zeros(d))
            return

        def draw() -> dict:
            assignment = balanced_assignment(D, d, config.seed, layout.b_entry_mask() if zero_delta else None)
            counts = np.bincount(assignment, minlength=d)
            return dict(
                digest=hashlib.sha256(assignment.astype("<i8").tobytes()).hexdigest()[:16],
                indices=torch.from_numpy(assignment).to(index_dtype),
                slot_scale=torch.from_numpy(1.0 / np.sqrt(counts)).to(torch.float32),
                first_b_slot=int(assignment[layout.b_entry_mask()].min()) if zero_delta else None,
            )

        self.fixed = shared_fixed_parts(("unilora", layout.fingerprint(), d, config.seed, zero_delta), draw)
        self._index_digest = self.fixed.digest
        self.register_buffer("indices", self.fixed.indices, persistent=False)
        self.register_buffer("slot_scale", self.fixed.slot_scale, persistent=False)
        generator = torch.Generator().manual_seed(config.seed)
        s = config.init_scale
        init = torch.rand(d, generator=generator) * 2 * s - s
        if zero_delta:
            init[self.fixed.first_b_slot:] = 0.0
        self.theta_d = nn.Parameter(init)

    def factors_from(self, theta):
        # Scale the d slots first, then one gather to D entries; backward is one scatter-add.
        flat = torch.index_select(theta * self.slot_scale, 0, self.indices)
        return self.layout.split(flat)

    @classmethod
    def vector_length(cls, layout, config):
        return config.theta_dim

    @classmethod
    def fixed_spec(cls, layout, config):
        return {"unilora.indices": ((layout.D,), "index")} if config.fixed_parts == "stored" else {}

    @classmethod
    def check_stored_values(cls, tensors, config):
        indices = tensors.get("unilora.indices")
        if indices is not None and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= config.theta_dim):
            raise UniLoraError(f"Uni-LoRA indices must lie in [0, {config.theta_dim}) (the length of θ_d), found "
                               f"{int(indices.min())}..{int(indices.max())}; the adapter file is damaged")

    @classmethod
    def build_bytes(cls, layout, config):
        # int64 draw, shuffle and bincount in numpy, the torch index copy, one reconstruction
        return 36 * layout.D + 16 * config.theta_dim

    def fit_to(self, target):
        # θ_d = Pᵀ θ_D, the least-squares fit since PᵀP = I: every entry added into its slot, times 1/sqrt(n_j)
        with torch.no_grad():
            theta = torch.zeros_like(self.theta_d).index_add_(0, self.indices.long(), target.to(self.theta_d.dtype))
            self.theta_d.copy_(theta * self.slot_scale)
        return True

    def stored_fixed_tensors(self):
        return {"unilora.indices": self.indices} if self.config.fixed_parts == "stored" else {}

    def stored_param_count(self):
        """θ_d, plus a stored index vector counted as float32 fractions (as VB-LoRA's indices)."""
        count = self.theta_d.numel()
        if self.config.fixed_parts == "stored":
            count += self.indices.numel() * self.indices.element_size() // 4
        return count

    def load_fixed_tensors(self, tensors):
        if self.config.fixed_parts != "stored":
            return
        indices = tensors["unilora.indices"].long()
        self.check_stored_values({"unilora.indices": indices}, self.config)
        copy_into(self.indices, indices, "unilora.indices")
        counts = torch.bincount(indices, minlength=self.config.theta_dim).to(torch.float64)
        # 1/sqrt(n_j) keeps PᵀP = I on the slots in use; an unused slot scales by 0 (never read)
        scale = torch.where(counts > 0, counts.clamp_min(1).rsqrt(), torch.zeros_like(counts))
        with torch.no_grad():
            self.slot_scale.copy_(scale.to(self.slot_scale.dtype))

    def metadata(self):
        return {} if self._index_digest is None else {"index_sha256": self._index_digest}

    # --- PEFT's UNILORA ------------------------------------------------------------------
    # θ_d as is; each layer's entries of our index vector as `indices_A` (r × in) and `indices_B`
    # (out × r, our Bᵀ transposed), their 1/sqrt(n_j) as `scales_A` / `scales_B` (our scaling folded into
    # `scales_B`). PEFT would redraw the indices from torch's RNG: the directory stores ours
    # (`save_indices`), and PEFT computes the same 1/sqrt(n_j) from them.
    def peft_state(self, names, save_projection=True):
        layout, s = self.layout, self.config.scaling
        indices = self.indices.long()
        state = {shared_key("unilora_theta_d"): self.theta_d.detach().clone()}
        for name, (idx_a, idx_bt), (sc_a, sc_bt) in zip(names, layout.split(indices),
                                                       layout.split(self.slot_scale[indices])):
            state[layer_key(name, "unilora_indices_A")] = idx_a.clone()
            state[layer_key(name, "unilora_indices_B")] = idx_bt.t().contiguous()
            state[layer_key(name, "unilora_scales_A")] = sc_a.clone()
            state[layer_key(name, "unilora_scales_B")] = (sc_bt.t() * s).contiguous()
        return state

    def peft_config(self, save_projection=True):
        return {"theta_d_length": self.config.theta_dim, "proj_seed": self.config.seed, "unilora_dropout": 0.0,
                "save_indices": True, "init_weights": True}

    @classmethod
    def from_peft(cls, source):
        """A directory saved with `save_indices=True` (the indices are kept: fixed_parts="stored")."""
        r, d = source.integers("r", "theta_d_length")
        modules = source.modules("unilora_indices_A")
        if not modules:
            raise UniLoraError(f"'{source.weights}' holds no UniLora indices: PEFT saved it without save_indices=True "
                               "and would redraw them from torch's RNG; re-save it with save_indices=True to convert "
                               "it exactly")
        if source.shape(shared_key("unilora_theta_d")) != (d,):
            raise UniLoraError(f"'{source.weights}' does not hold a theta_d of length {d}")
        slots, indices = [], []
        for name in modules:
            keys = layer_key(name, "unilora_indices_A"), layer_key(name, "unilora_indices_B")
            shape_a, shape_b = map(source.shape, keys)
            if shape_a is None or shape_b is None or len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != r \
                    or shape_b[1] != r:
                raise UniLoraError(f"'{source.weights}': the indices of '{name}' have shapes {shape_a}, {shape_b}; "
                                   f"expected ({r}, in) and (out, {r})")
            slots.append(Slot(name, shape_a[1], shape_b[0], r))
            indices.append(source.tensor(keys[0]).reshape(-1))
            indices.append(source.tensor(keys[1]).t().reshape(-1))  # our Bᵀ, row-major
        flat = torch.cat(indices)
        options = dict(method=cls.method, rank=r, theta_dim=d, fixed_parts="stored",
                       seed=int(source.config.get("proj_seed") or 0))
        tensors = {"unilora.theta_d": source.tensor(shared_key("unilora_theta_d")),
                   "unilora.indices": flat.to(torch.int32 if flat.numel() < 2**31 else torch.int64)}
        return PeftReading(slots, options, tensors)
