"""The SVD family's common part: frozen factors from the truncated SVD of each adapted base weight.

W = U Σ Vᵀ (out × in), its top r triplets computed once per layer in float32 on the weight's device,
batched over layers of one shape. A method of the family (LoRA-XS, TinyLoRA) trains only a small r × r core R
per layer (or the vectors that build it) and sets

    A_l = Σ_aᵀ V_rᵀ  (r × in, frozen),    Bᵀ_l = Rᵀ Σ_b U_rᵀ  (r × out),    ΔW_l = U_r Σ_b R Σ_a V_rᵀ

with Σ_b Σ_a = Σ_r split as the method says (LoRA-XS: Σ_b = Σ_r; TinyLoRA, as PEFT: √Σ_r each).

Sign convention: LAPACK, cuSOLVER and torch versions may return a singular pair (u_i, v_i) or
(-u_i, -v_i), and a flipped pair changes U_r Σ R V_rᵀ for the same R. Each pair is flipped so that
the entry of u_i with the largest magnitude is positive (scikit-learn's `svd_flip` rule).

Nothing of the SVD is stored: an adapter records a fingerprint of every layer's factors (the sum of
its r singular values and four sign-sensitive probes of U_r and V_r), and loading compares it, with
a tolerance, with the SVD of the model it is loaded onto. A different base model, or an SVD that came
out otherwise (near-equal singular values let U_r rotate), is refused in one line.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..core.errors import UniLoraError
from ..core.rng import SeededStream
from .base import FixedParts, Projection, shared_fixed_parts

# layers per batched SVD call are capped so that the stacked copy stays near this size
_BATCH_BYTES = 256 * 2**20
_SUM_RTOL, _PROBE_ATOL = 1e-4, 2e-3


def convention_signs(u: torch.Tensor) -> torch.Tensor:
    """±1 per column of U (..., out, r): the sign of the column's entry of largest magnitude."""
    largest = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, largest)).squeeze(-2)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _top_singular(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` singular triplets of a stack of matrices (n, out, in), descending. From the
    eigenvectors of the smaller Gram matrix (about 3x faster than a full SVD on CPU, and the top
    triplets are its best-conditioned part); a full SVD where the r-th singular value is too small
    for that (below 1e-3 of the first)."""
    wide = w.shape[-2] < w.shape[-1]
    gram = w @ w.transpose(-1, -2) if wide else w.transpose(-1, -2) @ w
    values, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -rank:].flip(-1)  # (n, small, r): eigh sorts ascending
    s = values[..., -rank:].flip(-1).clamp_min(0).sqrt()
    if bool((s[..., -1] <= 1e-3 * s[..., 0]).any()):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if wide:  # top holds U_r; V_rᵀ = Σ⁻¹ U_rᵀ W
        return top, s, (top.transpose(-1, -2) @ w) / s.unsqueeze(-1)
    return (w @ top) / s.unsqueeze(-2), s, top.transpose(-1, -2)  # top holds V_r; U_r = W V_r Σ⁻¹


def truncated_svd(weights: list[torch.Tensor], rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U_r (out × r), σ (r), V_rᵀ (r × in)) of each weight, in float32, signs fixed by the convention."""
    out: list = [None] * len(weights)
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault((tuple(w.shape), w.device), []).append(i)
    for (shape, _), indices in by_shape.items():
        per_batch = max(1, _BATCH_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, len(indices), per_batch):
            chunk = indices[start: start + per_batch]
            stacked = torch.stack([weights[i].detach().float() for i in chunk])
            u, s, vh = _top_singular(stacked, rank)
            signs = convention_signs(u)
            u, vh = u * signs.unsqueeze(-2), vh * signs.unsqueeze(-1)
            for j, i in enumerate(chunk):
                out[i] = (u[j].contiguous(), s[j].contiguous(), vh[j].contiguous())
    return out


def _probe(n: int, name: str) -> torch.Tensor:
    return torch.from_numpy(SeededStream(0, f"svd-probe-{name}-{n}").uniform(n) * 2 - 1).float()


def fingerprint(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> list[float]:
    """[Σσ_i, two probes of U_r, two of V_r] of one layer: each probe mixes its r columns with fixed
    positive weights, so flipping any one pair's sign moves it (two probes: both rarely stay put)."""
    r = s.numel()
    mix = torch.stack([_probe(r, "mix-1"), _probe(r, "mix-2")]).abs() + 0.5  # (2, r), in [0.5, 1.5]
    on_u = _probe(u.shape[0], "u") @ u.float().cpu()  # (r,)
    on_v = vh.float().cpu() @ _probe(vh.shape[1], "v")
    values = [float(s.sum()), *(mix @ on_u).tolist(), *(mix @ on_v).tolist()]
    return [float(f"{v:.7g}") for v in values]


def fingerprint_mismatch(saved, mine: list[list[float]], names: list[str]) -> str | None:
    """Why a recorded fingerprint does not fit this model's SVD (None when it does)."""
    if not (isinstance(saved, list) and len(saved) == len(mine)
            and all(isinstance(row, list) and len(row) == 5 for row in saved)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for row in saved for v in row)):
        return "its SVD fingerprint is not a list of five finite numbers per adapted layer"
    for name, theirs, ours in zip(names, saved, mine):
        if abs(theirs[0] - ours[0]) > _SUM_RTOL * abs(ours[0]) + 1e-6:
            return (f"layer '{name}': its singular values sum to {ours[0]:.6g} here, {theirs[0]:.6g} in the adapter "
                    "(another base model)")
        if any(abs(a - b) > _PROBE_ATOL * (1 + abs(b)) for a, b in zip(theirs[1:], ours[1:])):
            return (f"layer '{name}': its top singular vectors differ from the adapter's (another base model, or an SVD "
                    "that came out otherwise, e.g. near-equal singular values)")
    return None


def _anchor(weight: torch.Tensor) -> torch.Tensor:
    """The tensor a weight view was taken from (a Conv1D weight comes transposed)."""
    return weight._base if weight._base is not None else weight


class SVDProjection(Projection):
    """A projection whose frozen A and left factor come from the base weights' SVD (see the module
    docstring); subclasses give the trained core R of every layer (`cores`) and the Σ split."""

    needs_base_weights = True
    sqrt_split = False  # True: √Σ on each side (TinyLoRA, as PEFT); False: Σ with U (LoRA-XS)

    def __init__(self, layout, config):
        super().__init__(layout, config)
        for slot in layout.slots:
            if config.rank > min(slot.in_features, slot.out_features):
                raise UniLoraError(f"rank {config.rank} exceeds layer '{slot.name}' ({slot.out_features} x "
                                   f"{slot.in_features}); the SVD gives at most {min(slot.in_features, slot.out_features)}")
        shapes = sorted({(s.in_features, s.out_features) for s in layout.slots})
        self.shape_groups = [[i for i, s in enumerate(layout.slots) if (s.in_features, s.out_features) == shape]
                             for shape in shapes]
        self.svd = None  # the shared frozen factors, set by attach
        self.half_precision_base = False  # whether attach saw float16 / bfloat16 weights (a hint when refused)

    # --- the frozen factors --------------------------------------------------------
    def attach(self, base_weights):
        anchors = [_anchor(w) for w in base_weights]
        key = ("svd", self.sqrt_split, self.config.rank,
               tuple((id(a), a._version, tuple(w.shape), a.device.type) for a, w in zip(anchors, base_weights)))
        refs = [weakref.ref(a) for a in anchors]

        def still_valid(parts) -> bool:  # the same weight tensors, not new ones at a reused address
            return all(ref() is a for ref, a in zip(parts._refs, anchors))

        def draw() -> dict:
            return dict(self._frozen_parts(truncated_svd(base_weights, self.config.rank)), _refs=refs)

        self.attach_parts(shared_fixed_parts(key, draw, still_valid=still_valid))
        self.half_precision_base = any(w.dtype in (torch.float16, torch.bfloat16) for w in base_weights)

    def attach_factors(self, factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Attach from given (U_r, σ, V_rᵀ) per layer (a converted adapter's own), signs already fixed."""
        self.attach_parts(FixedParts(**self._frozen_parts(factors)))

    def _frozen_parts(self, factors) -> dict:
        parts = {"fingerprint": [fingerprint(*f) for f in factors]}
        for g, layers in enumerate(self.shape_groups):
            left, right = [], []
            for i in layers:
                u, s, vh = factors[i]
                left_scale, right_scale = (s.sqrt(), s.sqrt()) if self.sqrt_split else (s, torch.ones_like(s))
                left.append((u * left_scale).t())  # (r, out): Σ_b U_rᵀ
                right.append(right_scale.unsqueeze(1) * vh)  # (r, in): Σ_a V_rᵀ
            parts[f"left_{g}"] = torch.stack(left).contiguous()
            parts[f"right_{g}"] = torch.stack(right).contiguous()
        return parts

    def attach_parts(self, parts) -> None:
        self.fixed, self.svd, self.attached = parts, parts.fingerprint, True
        for g, layers in enumerate(self.shape_groups):
            self.register_buffer(f"left_{g}", getattr(parts, f"left_{g}"), persistent=False)
            self.register_buffer(f"right_{g}", getattr(parts, f"right_{g}"), persistent=False)
            self.register_buffer(f"layers_{g}", torch.tensor(layers), persistent=False)

    def svd_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's frozen (Σ_a V_rᵀ (r × in), U_r Σ_b (out × r)), so ΔW_l = U_r Σ_b R_l Σ_a V_rᵀ."""
        self.require_attached()
        pairs: list = [None] * len(self.layout)
        for g, layers in enumerate(self.shape_groups):
            right, left = getattr(self, f"right_{g}"), getattr(self, f"left_{g}")
            for j, i in enumerate(layers):
                pairs[i] = (right[j], left[j].t())
        return pairs

    def fixed_buffer_names(self):
        return {f"{kind}_{g}" for g in range(len(self.shape_groups)) for kind in ("left", "right", "layers")}

    # --- the projection ------------------------------------------------------------
    def cores(self, theta: torch.Tensor) -> torch.Tensor:
        """Every layer's trained r × r core R, stacked (L, r, r)."""
        raise NotImplementedError

    def factors_from(self, theta):
        self.require_attached()
        cores = self.cores(theta)
        pairs: list = [None] * len(self.layout)
        for g, layers in enumerate(self.shape_groups):
            bt = torch.matmul(cores[getattr(self, f"layers_{g}")].transpose(1, 2), getattr(self, f"left_{g}"))
            right = getattr(self, f"right_{g}")
            for j, i in enumerate(layers):
                pairs[i] = (right[j], bt[j])
        return pairs

    @classmethod
    def build_bytes(cls, layout, config):
        return 12 * layout.D  # the frozen factors (float32) and one reconstruction of Bᵀ

    # --- checks on reload ----------------------------------------------------------
    def seeded_metadata(self) -> dict:
        """Checksums of the method's seeded parts (TinyLoRA's P), compared exactly on reload."""
        return {}

    def metadata(self):
        return {} if self.svd is None else {**self.seeded_metadata(), "svd_fingerprint": self.svd}

    def check_metadata(self, saved):
        if "svd_fingerprint" not in saved:
            raise UniLoraError(f"{self.method} adapter config lacks 'svd_fingerprint' under 'projection': without it the "
                               "base model's SVD cannot be checked; re-save the adapter with this unilora version")
        for key, value in self.seeded_metadata().items():
            if saved.get(key) != value:
                raise UniLoraError(f"{self.method} adapter was saved with {key}={saved.get(key)!r} but this install "
                                   f"rebuilds {value!r}; its seeded parts differ, so the adapter cannot be used here")
        if self.svd is None:  # read without its base model (inspect, count): nothing to compare with
            return
        why = fingerprint_mismatch(saved["svd_fingerprint"], self.svd, [s.name for s in self.layout.slots])
        if why:
            hint = ("; if it was trained on this model in float32, load the model in float32 (its weights' SVD moves when "
                    "they are rounded to 16 bits), or merge or export the adapter (unilora export) for 16-bit serving"
                    if self.half_precision_base else "")
            raise UniLoraError(f"this {self.method} adapter does not fit this base model: {why}; load it onto the base "
                               f"model it was trained on{hint}")
