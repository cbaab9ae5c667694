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
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Choice, Integer, MethodOptions, Number, option
from ..core.errors import UniLoraError
from ..core.finite import check_finite
from ..core.layout import Slot
from ..core.registry import register_method
from ..core.targeting import base_module, base_weights, linear_shape
from .base import Recipe, TrainedVector, copy_into, shared_fixed_parts
from .peft_format import PeftReading, layer_key, shared_key
from .svd import SVDProjection, truncated_svd


@dataclass
class TinyLoRAOptions(MethodOptions):
    u: int = option(64, Integer(1, 2**20), "length of each trained vector v")
    weight_tying: float = option(0.0, Number(0.0, 1.0), "share of layers tied to one v, 0 (a v per layer) to 1 "
                                 "(one v for the whole model)")
    # "seeded": P is drawn from `seed`; "stored": the file holds P (converted from PEFT with flipped SVD
    # signs or its own draw)
    fixed_parts: str = option("seeded", Choice(("seeded", "stored")))
    left_out_at_default = ("fixed_parts", "u", "weight_tying")


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
    summary = "LoRA-XS with each layer's r x r core built from a tiny trained vector (u numbers, shared by tied layers)"
    options = TinyLoRAOptions
    vector = TrainedVector("v", "tinylora.v", "v")
    peft_type = "TINYLORA"
    peft_needs_model = "weights"  # PEFT's factors are checked against the SVD of the model's weights
    peft_projection_optional = True  # PEFT can redraw P from projection_seed, as ours does
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

    def cores(self, theta):
        v = theta.view(-1, self.config.u)[self.group_of]  # (L, u)
        return torch.einsum("li,lijk->ljk", v, self.projections)

    @classmethod
    def vector_length(cls, layout, config):
        return (max(tying_groups(len(layout), config.weight_tying)) + 1) * config.u

    @classmethod
    def fixed_spec(cls, layout, config):
        r = config.rank
        return {"tinylora.projections": ((len(layout), config.u, r, r), "float")} if config.fixed_parts == "stored" \
            else {}

    @classmethod
    def build_bytes(cls, layout, config):
        return super().build_bytes(layout, config) + 8 * len(layout) * config.u * config.rank**2

    def stored_fixed_tensors(self):
        return {"tinylora.projections": self.projections} if self.config.fixed_parts == "stored" else {}

    def load_fixed_tensors(self, tensors):
        if self.config.fixed_parts == "stored":
            copy_into(self.projections, tensors["tinylora.projections"], "tinylora.projections")

    def seeded_metadata(self):
        return {} if self.projections_digest is None else {"projections_sha256": self.projections_digest}

    # --- PEFT's TINYLORA -----------------------------------------------------------------
    # v per group as `tinylora_v.<g>`; each layer's frozen √σ V_rᵀ and U_r √σ as `tinylora_A` / `tinylora_B`
    # (the scaling folded into B: PEFT has none) and, with save_projection, its P as `tinylora_P`.
    def peft_state(self, names, save_projection=True):
        if not save_projection and self.config.fixed_parts == "stored":
            raise UniLoraError("this TinyLoRA adapter stores its P tensors (it came from PEFT with flipped SVD signs or "
                               "its own draw), so PEFT could not redraw them from the seed: convert it with "
                               "save_projection")
        state = {}
        for g, v in enumerate(self.v.detach().view(-1, self.config.u)):
            state[shared_key(f"tinylora_v.{g}")] = v.clone()
        for name, (a, b), p in zip(names, self.svd_factors(), self.projections):
            state[layer_key(name, "tinylora_A")] = a.clone()
            state[layer_key(name, "tinylora_B")] = (b * self.config.scaling).contiguous()
            if save_projection:
                state[layer_key(name, "tinylora_P")] = p.clone()
        return state

    def peft_config(self, save_projection=True):
        c = self.config
        return {"u": c.u, "weight_tying": c.weight_tying, "projection_seed": c.seed, "save_projection": save_projection,
                "init_weights": True, "tinylora_dropout": 0.0}

    @classmethod
    def from_peft(cls, source):
        """PEFT's tinylora_A = √σ V_rᵀ and tinylora_B = U_r √σ are checked against the SVD of the base
        model's weights (`source.model`, with weights), which our adapter rebuilds at load and records
        the fingerprint of: PEFT rounds the factors to the base model's dtype, so a bfloat16 model's
        factors could never match our float32 SVD's fingerprint themselves. Pairs whose signs differ
        from ours flip P's rows and columns (D P D), so ΔW is unchanged."""
        r, u = source.integers("r", "u")
        tying, seed = source.config.get("weight_tying", 0.0), source.config.get("projection_seed", 42)
        if not (isinstance(tying, (int, float)) and not isinstance(tying, bool) and 0 <= tying <= 1):
            raise source.config_error(f": weight_tying must be a number in [0, 1], got {tying!r}")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63 - 2**31):
            raise source.config_error(f": projection_seed must be a non-negative integer, got {seed!r}")
        modules = set(source.modules("tinylora_A"))
        if not modules:
            raise UniLoraError(f"'{source.weights}' holds no TinyLoRA factors (tinylora_A / tinylora_B)")
        order = source.model_order(modules, "TINYLORA")  # PEFT numbers the layers in model order (P's seeds, v's groups)
        groups = tying_groups(len(order), float(tying))
        v_keys = [shared_key(f"tinylora_v.{g}") for g in range(max(groups) + 1)]
        if any(source.shape(key) != (u,) for key in v_keys) or \
                len([k for k in source.shapes if ".tinylora_v." in k]) != len(v_keys):
            raise UniLoraError(f"'{source.weights}' does not hold {len(v_keys)} TinyLoRA vectors of length {u} (one per "
                               f"group of {len(order)} layers at weight_tying={tying})")
        layer_keys = [{part: layer_key(name, f"tinylora_{part}") for part in ("A", "B", "P")} for name in order]
        slots = []
        for name, keys in zip(order, layer_keys):  # every shape checked before the SVD is taken
            n_in, n_out = linear_shape(base_module(source.model, name))
            if source.shape(keys["A"]) != (r, n_in) or source.shape(keys["B"]) != (n_out, r) or \
                    source.shapes.get(keys["P"], (u, r, r)) != (u, r, r):
                raise UniLoraError(f"'{source.weights}': the factors of '{name}' have shapes {source.shape(keys['A'])}, "
                                   f"{source.shape(keys['B'])}; this model's layer needs ({r}, {n_in}) and ({n_out}, {r})")
            slots.append(Slot(name, n_in, n_out, r))
        factors = truncated_svd(base_weights(source.model, order), r)  # ours, as the adapter rebuilds them at load
        projections, seeded = [], True
        for index, (name, keys, (left, s, right)) in enumerate(zip(order, layer_keys, factors)):
            a, b = source.tensor(keys["A"]), source.tensor(keys["B"])
            check_finite({keys["A"]: a, keys["B"]: b}, "refusing to convert", "the PEFT adapter holds non-finite values")
            signs = peft_svd_signs(a, b, left, s, right, name)
            drawn = draw_projections(1, u, r, seed + index)[0]
            p = source.tensor(keys["P"]).float() if keys["P"] in source.shapes else drawn
            seeded = seeded and bool((signs > 0).all()) and torch.equal(p, drawn)
            projections.append(p * signs.view(1, r, 1) * signs.view(1, 1, r))
        options = dict(method=cls.method, rank=r, u=u, weight_tying=float(tying), seed=seed,
                       fixed_parts="seeded" if seeded else "stored")
        tensors = {"tinylora.v": torch.cat([source.tensor(key) for key in v_keys])}
        if not seeded:
            tensors["tinylora.projections"] = torch.stack(projections)
        return PeftReading(slots, options, tensors, factors)


def peft_svd_signs(a: torch.Tensor, b: torch.Tensor, left: torch.Tensor, s: torch.Tensor, right: torch.Tensor,
                   name: str) -> torch.Tensor:
    """±1 per pair: PEFT's (tinylora_B, tinylora_A) of one layer against our SVD (U_r, σ, V_rᵀ) of the
    base weight, after checking they are the same truncated SVD to the precision PEFT stored them in."""
    a, b = a.float(), b.float()
    half = any(all(torch.equal(t, t.to(low).float()) for t in (a, b)) for low in (torch.bfloat16, torch.float16))
    ours = (left * s) @ right
    gap = float(torch.linalg.matrix_norm(b @ a - ours) / torch.linalg.matrix_norm(ours).clamp_min(1e-30))
    tolerance = 2e-2 if half else 1e-4  # a half-precision model's factors (PEFT rounds them): bfloat16 keeps 8 bits
    if not gap <= tolerance:
        raise UniLoraError(f"the PEFT adapter's SVD factors of '{name}' differ from the given model's (relative "
                           f"difference {gap:.2g} of the rank-{s.numel()} part): give the base model it was trained on")
    agreement = (b * left).sum(dim=0) / (b.norm(dim=0) * left.norm(dim=0)).clamp_min(1e-30)
    if not bool((agreement.abs() > 0.5).all()):
        raise UniLoraError(f"the PEFT adapter's singular vectors of '{name}' are not the given model's, though they span "
                           "the same space (near-equal singular values); this adapter cannot be converted exactly")
    return torch.sign(agreement)
