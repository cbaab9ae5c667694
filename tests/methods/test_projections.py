"""Every method checked against its definition: P built densely from the formula, compared with
the fast path (θ_D == P θ_d) and with autograd (∇θ_d == Pᵀ ∇θ_D)."""

import math

import numpy as np
import pytest
import torch

from unilora import AdapterConfig, UniLoraError
from unilora.core.layout import Layout, Slot
from unilora.methods import PROJECTIONS
from unilora.methods.fastfood import fwht
from unilora.methods.unilora import balanced_assignment

# Three layers of different shapes, all divisible by b = 8.
LAYOUT = Layout([Slot("l0.q", 16, 24, 3), Slot("l0.v", 16, 16, 3), Slot("l1.up", 24, 8, 3)])


def base_weights(layout=LAYOUT, seed=5):
    """A random frozen weight (out × in) per slot, for the methods built from the base weights' SVD."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s.out_features, s.in_features, generator=generator) for s in layout.slots]


def make(method, **overrides):
    options = dict(method=method, rank=3, theta_dim=50, num_vectors=6, vector_length=8, topk=2, seed=7, u=4,
                   weight_tying=0.5)
    options.update(overrides)
    proj = PROJECTIONS[method](LAYOUT, AdapterConfig(**options))
    if proj.needs_base_weights:
        proj.attach(base_weights())
    return proj


def offsets(layout):
    """(offset of A, offset of Bᵀ) of every slot in θ_D."""
    out, pos = [], 0
    for s in layout.slots:
        out.append((pos, pos + s.a_numel))
        pos += s.a_numel + s.b_numel
    return out


def dense_unilora(proj):
    idx = proj.indices.long().numpy()
    counts = np.bincount(idx, minlength=proj.theta.numel())
    P = torch.zeros(LAYOUT.D, proj.theta.numel())
    P[torch.arange(LAYOUT.D), torch.from_numpy(idx)] = torch.from_numpy(1 / np.sqrt(counts[idx])).float()
    return P


def dense_vera_like(proj, shared_a, shared_bt):
    """A_l[k, j] = d_l[k] · A[k, j];  Bᵀ_l[k, o] = Bᵀ[k, o] · b_l[o]  (per-layer scale vectors)."""
    P = torch.zeros(LAYOUT.D, proj.theta.numel())
    col = 0
    for s, (a_off, b_off), a, bt in zip(LAYOUT.slots, offsets(LAYOUT), shared_a, shared_bt):
        for k in range(s.rank):
            for j in range(s.in_features):
                P[a_off + k * s.in_features + j, col + k] = a[k, j]
        col += s.rank
        for k in range(s.rank):
            for o in range(s.out_features):
                P[b_off + k * s.out_features + o, col + o] = bt[k, o]
        col += s.out_features
    return P


def hadamard(n):
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def dense_fastfood(proj):
    L, d = proj.padded, proj.theta.numel()
    H = hadamard(L)
    Pi = torch.zeros(L, L)
    Pi[torch.arange(L), proj.permutation] = 1.0
    full = proj.scale * H @ torch.diag(proj.gauss) @ Pi @ H @ torch.diag(proj.signs)
    return full[: LAYOUT.D, :d]


def dense_vblora(proj):
    """θ_D[(s, p)] = Σ_t w[s, t] · bank[idx[s, t], p]: linear in the bank for a fixed selection."""
    b = proj.config.vector_length
    idx, w = proj.topk_selection()
    P = torch.zeros(LAYOUT.D, proj.bank.numel())
    for s in range(proj.num_subvectors):
        for t in range(idx.shape[1]):
            for p in range(b):
                P[s * b + p, idx[s, t] * b + p] += w[s, t]
    return P


def dense_svd(proj):
    """Bᵀ_l[k, o] = Σ_j R_l[j, k] · left_l[j, o] with R_l = θ's r × r block (LoRA-XS) or
    Σ_i v_{g(l), i} P_l[i] (TinyLoRA); A_l is frozen (the constant part of θ_D, not in P)."""
    r, d = proj.config.rank, proj.theta.numel()
    P = torch.zeros(LAYOUT.D, d)
    for l, (s, (_, b_off), (_, b)) in enumerate(zip(LAYOUT.slots, offsets(LAYOUT), proj.svd_factors())):
        left = b.t()  # (r, out)
        for j in range(r):
            for k in range(r):
                for o in range(s.out_features):
                    row = b_off + k * s.out_features + o
                    if proj.method == "lora_xs":
                        P[row, l * r * r + j * r + k] += left[j, o]
                    else:
                        g, u = int(proj.group_of[l]), proj.config.u
                        P[row, g * u: (g + 1) * u] += proj.projections[l][:, j, k] * left[j, o]
    return P


def dense_P(method, proj):
    if method in ("lora_xs", "tinylora"):
        return dense_svd(proj)
    if method == "lora":
        return torch.eye(LAYOUT.D)
    if method == "unilora":
        return dense_unilora(proj)
    if method == "vera":
        shared_a = [proj.shared_a[:, : s.in_features] for s in LAYOUT.slots]
        shared_bt = [proj.shared_bt[:, : s.out_features] for s in LAYOUT.slots]
        return dense_vera_like(proj, shared_a, shared_bt)
    if method == "tied_lora":
        with torch.no_grad():
            for bt in proj.shared_bt:  # B starts at zero; give it values so P is not trivially zero
                bt.normal_()
        return dense_vera_like(proj, [proj.shared_a[g].detach() for g in proj.group_of],
                               [proj.shared_bt[g].detach() for g in proj.group_of])
    if method == "fastfood":
        return dense_fastfood(proj)
    if method == "vblora":
        proj.eval()
        return dense_vblora(proj)
    raise AssertionError(method)


@pytest.mark.parametrize("method", sorted(PROJECTIONS))
def test_fast_path_equals_dense_projection_and_its_transpose(method):
    proj = make(method)
    P = dense_P(method, proj)
    theta = torch.randn(proj.theta.shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    theta_D = proj.project(theta)
    assert theta_D.shape == (LAYOUT.D,)
    constant = proj.project(torch.zeros_like(theta)).detach()  # the SVD methods' frozen A; zero for the others
    assert proj.needs_base_weights or not constant.any()
    expected = constant + P @ theta.detach().reshape(-1)
    assert torch.allclose(theta_D, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(LAYOUT.D, generator=torch.Generator().manual_seed(1))
    (theta_D * grad_out).sum().backward()
    assert torch.allclose(theta.grad.reshape(-1), P.t() @ grad_out, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(PROJECTIONS))
def test_factors_are_views_of_theta_D_in_layout_order(method):
    proj = make(method).eval()
    factors = proj.factors()
    assert len(factors) == len(LAYOUT)
    for (a, bt), s in zip(factors, LAYOUT.slots):
        assert a.shape == (s.rank, s.in_features) and bt.shape == (s.rank, s.out_features)
    flat = torch.cat([t.reshape(-1) for pair in factors for t in pair])
    assert torch.equal(flat, proj.project(proj.theta))


def test_unilora_projection_is_isometric():
    P = dense_unilora(make("unilora"))
    assert torch.allclose(P.t() @ P, torch.eye(P.shape[1]), atol=1e-6)
    assert (P != 0).sum(1).eq(1).all(), "every row of P has exactly one nonzero"


@pytest.mark.parametrize("D,d", [(100, 7), (64, 64), (1000, 999), (10, 1)])
def test_unilora_draw_is_balanced_and_seeded(D, d):
    assignment = balanced_assignment(D, d, seed=11)
    counts = np.bincount(assignment, minlength=d)
    assert counts.min() >= D // d and counts.max() <= math.ceil(D / d)
    assert np.array_equal(assignment, balanced_assignment(D, d, seed=11))
    if 1 < d < D:
        assert not np.array_equal(assignment, balanced_assignment(D, d, seed=12))


def test_unilora_draw_is_pinned_across_versions():
    # Adapters store only θ_d and the seed, so this draw must never change: a golden value
    # recorded when the format was fixed. If it changes, old adapters silently break.
    assert balanced_assignment(12, 5, seed=0).tolist() == [2, 2, 0, 1, 3, 0, 3, 1, 4, 1, 4, 0]


def test_unilora_zero_delta_starts_at_zero_and_still_trains():
    proj = make("unilora", init="zero_delta")
    P = dense_unilora(proj)
    assert torch.allclose(P.t() @ P, torch.eye(P.shape[1]), atol=1e-6)
    factors = proj.factors()
    assert all(bt.abs().max() == 0 for _, bt in factors)
    assert all(a.abs().max() > 0 for a, _ in factors)
    # gradient of a loss through ΔW = Bᵀᵀ A is nonzero (B's gradient is A-weighted)
    loss = sum(((bt.t() @ a) * torch.randn(bt.shape[1], a.shape[1])).sum() for a, bt in factors)
    loss.backward()
    assert proj.theta.grad.abs().max() > 0


def test_unilora_all_zero_theta_would_not_train():
    # Why zero_delta exists: with θ_d = 0 both A and B vanish and so does every gradient.
    proj = make("unilora")
    with torch.no_grad():
        proj.theta.zero_()
    loss = sum(((bt.t() @ a) * torch.randn(bt.shape[1], a.shape[1])).sum() for a, bt in proj.factors())
    loss.backward()
    assert proj.theta.grad.abs().max() == 0


def test_unilora_rejects_d_larger_than_D():
    with pytest.raises(UniLoraError, match="exceeds D"):
        make("unilora", theta_dim=LAYOUT.D + 1)


def test_fwht_matches_dense_hadamard():
    x = torch.randn(32)
    assert torch.allclose(fwht(x), hadamard(32) @ x, atol=1e-5)


def test_fastfood_columns_have_unit_norm_before_truncation():
    layout = Layout([Slot("a", 8, 8, 4)])  # D = 64, a power of two: no truncation
    proj = PROJECTIONS["fastfood"](layout, AdapterConfig(method="fastfood", rank=4, theta_dim=10, seed=1))
    P = torch.stack([proj.project(torch.eye(10)[i]) for i in range(10)], 1)
    assert torch.allclose(P.norm(dim=0), torch.ones(10), atol=1e-5)


def test_vblora_logit_gradients_match_finite_differences():
    proj = make("vblora").double()
    logits = (torch.randn(proj.logits.shape, dtype=torch.float64) * 2).requires_grad_(True)
    bank = torch.randn(proj.bank.shape, dtype=torch.float64, requires_grad=True)

    def theta_D(lg, bk):
        return torch.func.functional_call(proj, {"logits": lg, "bank": bk}, ())

    assert torch.autograd.gradcheck(theta_D, (logits, bank), eps=1e-6, atol=1e-5)


def test_vblora_selection_modes():
    base = make("vblora")
    with torch.no_grad():
        base.logits.normal_()
    eval_topk = base.eval().project(base.bank)
    for mode in ("noisy_topk", "gumbel", "st_gumbel"):
        proj = make("vblora", selection=mode)
        proj.load_state_dict(base.state_dict())
        assert torch.equal(proj.eval().project(proj.bank), eval_topk), f"{mode}: eval must be noise-free top-k"
        train_out = proj.train().project(proj.bank)
        assert not torch.allclose(train_out, eval_topk), f"{mode}: training must differ (noise)"
    st = make("vblora", selection="st_gumbel").train()
    sub = st.subvectors(st.bank).detach()
    bank_rows = st.bank.detach()
    assert all(any(torch.allclose(row, v) for v in bank_rows) for row in sub), "ST-GS picks one bank vector"
    every = make("vblora", selection="all", store="logits").train()
    every.load_state_dict(base.state_dict())
    expected = (torch.softmax(every.logits, -1) @ every.bank).reshape(-1)
    assert torch.allclose(every.project(every.bank), expected, atol=1e-6)
    assert torch.allclose(every.eval().project(every.bank), expected, atol=1e-6)


def test_vblora_select_all_cannot_store_topk():
    with pytest.raises(UniLoraError, match="store='logits'"):
        AdapterConfig(method="vblora", selection="all")


def test_vblora_names_the_layer_b_does_not_divide():
    layout = Layout([Slot("enc.0.query", 16, 16, 2), Slot("enc.0.odd", 16, 20, 2)])
    with pytest.raises(UniLoraError, match=r"enc\.0\.odd.*20x16"):
        PROJECTIONS["vblora"](layout, AdapterConfig(method="vblora", vector_length=8, num_vectors=4))


def test_vblora_topk_storage_round_trip():
    proj = make("vblora")
    with torch.no_grad():
        proj.logits.normal_()
    proj.eval()
    stored = proj.stored_tensors()
    assert stored["vblora.topk_indices"].dtype == torch.uint8
    assert stored["vblora.topk_weights"].shape == (proj.num_subvectors, 1)
    fresh = make("vblora", seed=99).eval()
    fresh.load_stored_tensors(stored)
    assert torch.allclose(fresh.project(fresh.bank), proj.project(proj.bank), atol=1e-6)
    idx_a, w_a = proj.topk_selection()
    idx_b, w_b = fresh.topk_selection()
    assert torch.equal(idx_a, idx_b) and torch.allclose(w_a, w_b, atol=1e-6)


def test_vblora_wide_banks_use_wider_indices():
    proj = make("vblora", num_vectors=300)
    assert proj.stored_tensors()["vblora.topk_indices"].dtype == torch.int16
    n = proj.num_subvectors
    assert proj.stored_param_count() == 300 * 8 + n * 2 * 2 // 4 + n
