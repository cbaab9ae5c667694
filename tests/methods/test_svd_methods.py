"""The SVD family (LoRA-XS, TinyLoRA): frozen factors from the base weights' truncated SVD, one sign
convention, a fingerprint that refuses another base or another SVD, one SVD per base shared by every
adapter on it, and the stored-parameter counts of the papers. (Dense P and gradients: test_projections;
export, merge, mixed batches, save/load, DDP and checkpointing: the shared matrices over unilora.METHODS;
conversion to and from PEFT's TINYLORA: test_peft_native.)"""

import pytest
import torch

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main
from unilora.methods import svd
from unilora.methods.svd import convention_signs, fingerprint, fingerprint_mismatch, truncated_svd

from conftest import build, logits_of


def weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in [(24, 16), (16, 16), (24, 16), (16, 16), (24, 16)]]


def test_svd_is_the_truncated_svd_with_one_sign_convention_batched_or_not():
    ws = weights()
    batched = truncated_svd(ws, 3)
    for w, (u, s, vh) in zip(ws, batched):
        raw_u, raw_s, raw_vh = torch.linalg.svd(w, full_matrices=False)
        best = raw_u[:, :3] @ torch.diag(raw_s[:3]) @ raw_vh[:3]
        torch.testing.assert_close(u @ torch.diag(s) @ vh, best, atol=1e-5, rtol=0)
        largest = u.gather(0, u.abs().argmax(0, keepdim=True))
        assert (largest > 0).all(), "each column's largest entry is positive"
        alone = truncated_svd([w], 3)[0]  # one layer at a time gives the same factors
        for mine, theirs in zip((u, s, vh), alone):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
        flipped = raw_u[:, :3] * torch.tensor([1.0, -1.0, -1.0])  # what another SVD library may return
        # two algorithms (LAPACK's SVD, ours from the Gram matrix) agree on singular vectors to about
        # eps / (gap between singular values), seen up to 1.2e-5 here: a flipped sign would be off by ~0.5
        torch.testing.assert_close(flipped * convention_signs(flipped), u, atol=1e-4, rtol=0)


def test_the_fingerprint_catches_any_flipped_pair_and_tolerates_rounding():
    w = weights()[0]
    u, s, vh = truncated_svd([w], 3)[0]
    mine = [fingerprint(u, s, vh)]
    for pair in range(3):
        sign = torch.ones(3)
        sign[pair] = -1
        other = [fingerprint(u * sign, s, vh * sign.unsqueeze(1))]
        assert "top singular vectors differ" in fingerprint_mismatch(other, mine, ["layer"])
    rounded = truncated_svd([w * (1 + 1e-7 * torch.randn(w.shape))], 3)[0]
    assert fingerprint_mismatch([fingerprint(*rounded)], mine, ["layer"]) is None
    assert "singular values sum" in fingerprint_mismatch([fingerprint(u, s * 1.01, vh)], mine, ["layer"])
    assert "five finite numbers" in fingerprint_mismatch([[float("nan")] * 5], mine, ["layer"])


@pytest.mark.parametrize("method", ["lora_xs", "tinylora"])
def test_an_adapter_refuses_another_base_or_an_svd_with_other_signs(method, ids, tmp_path, monkeypatch):
    model = get_model(build("llama"), AdapterConfig(method=method, rank=2, u=3, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        model.projection.theta.normal_(generator=torch.Generator().manual_seed(0))
    model.eval().save_pretrained(tmp_path / "a")
    expected = logits_of(model, ids)
    assert torch.equal(logits_of(unilora.from_pretrained(build("llama"), tmp_path / "a"), ids), expected)
    with pytest.raises(UniLoraError, match="another base model") as refused:
        unilora.from_pretrained(build("llama", seed=1), tmp_path / "a")
    assert "\n" not in str(refused.value)

    def other_signs(u):  # as if the SVD had come out with the second pair's sign flipped
        signs = convention_signs(u).clone()
        signs[..., 1] *= -1
        return signs

    monkeypatch.setattr(svd, "convention_signs", other_signs)
    with pytest.raises(UniLoraError, match="top singular vectors differ"):
        unilora.from_pretrained(build("llama"), tmp_path / "a")


def test_a_float32_adapter_on_a_16_bit_model_says_how_to_serve_it(ids, tmp_path):
    """Rounding the weights to bfloat16 moves their SVD past the fingerprint's tolerance (measured on
    MiniLM too): refused, with the ways that work; loading in float32 and casting after keeps the
    float32 factors (they are buffers, cast with the model)."""
    model = get_model(build("llama"), AdapterConfig(method="lora_xs", rank=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        model.projection.theta.normal_(generator=torch.Generator().manual_seed(0))
    model.eval().save_pretrained(tmp_path / "a")
    with pytest.raises(UniLoraError, match="load the model in float32") as refused:
        unilora.from_pretrained(build("llama").to(torch.bfloat16), tmp_path / "a")
    assert "\n" not in str(refused.value)
    with pytest.raises(UniLoraError) as refused:  # a float32 model of other weights: no word of 16 bits
        unilora.from_pretrained(build("llama", seed=1), tmp_path / "a")
    assert "float32" not in str(refused.value)
    cast = unilora.from_pretrained(build("llama"), tmp_path / "a").to(torch.bfloat16)
    assert cast.projection.left_0.dtype == torch.bfloat16
    torch.testing.assert_close(logits_of(cast, ids).float(), logits_of(model, ids), atol=0.05, rtol=0.05)


def test_one_svd_per_base_model_shared_by_its_adapters(monkeypatch):
    calls = []
    original = svd.truncated_svd
    monkeypatch.setattr(svd, "truncated_svd", lambda ws, r: calls.append(len(ws)) or original(ws, r))
    model = get_model(build("llama"), AdapterConfig(method="lora_xs", rank=2, target_modules="all-linear"))
    model.add_adapter("second", AdapterConfig(method="lora_xs", rank=2, seed=5, target_modules="all-linear"))
    assert calls == [14]  # 2 blocks x 7 linear layers, once
    first, second = model.projections["default"], model.projections["second"]
    assert first.left_0.data_ptr() == second.left_0.data_ptr(), "the frozen factors are one copy"
    model.add_adapter("tiny", AdapterConfig(method="tinylora", rank=2, target_modules="all-linear"))
    assert calls == [14, 14]  # TinyLoRA splits Σ otherwise (√Σ each side): its own factors
    get_model(build("llama"), AdapterConfig(method="lora_xs", rank=2, target_modules="all-linear"))
    assert calls == [14, 14, 14]  # another model's weights: computed again, never taken for these


@pytest.mark.parametrize("method", ["lora_xs", "tinylora"])
def test_training_starts_at_the_base_model_and_moves_the_core(method, ids):
    model = get_model(build("llama"), AdapterConfig(method=method, rank=2, u=4, target_modules="all-linear"))
    with model.disable_adapter():
        base = logits_of(model, ids)
    out = logits_of(model.train(), ids)
    assert torch.equal(out, base), "R = 0 (LoRA-XS) and v = 0 (TinyLoRA): ΔW = 0 at step 0"
    out.square().mean().backward()
    assert model.projection.theta.grad.abs().sum() > 0


@pytest.mark.parametrize("options,stored", [(["--method", "lora_xs", "--rank", "2"], 24 * 2 * 2),
                                            (["--method", "tinylora", "--u", "13", "--weight-tying", "1"], 13),
                                            (["--method", "tinylora", "--u", "13", "--weight-tying", "0"], 24 * 13),
                                            (["--method", "tinylora", "--u", "13", "--weight-tying", "0.5"], 12 * 13)])
def test_counts_on_roberta_base_query_value_follow_the_papers_formulas(options, stored, capsys):
    # LoRA-XS: r² per adapted layer; TinyLoRA: u per group of tied layers (24 layers: q and v of 12 blocks)
    assert main(["count", "--arch", "roberta-base", "--targets", "qv", *options]) == 0
    out = capsys.readouterr().out
    assert f"stored_params: {stored:,}" in out or f"stored_params: {stored}" in out


def test_inspect_reads_an_svd_adapter_without_its_base_model(tmp_path, capsys):
    config = AdapterConfig(method="tinylora", rank=2, u=13, weight_tying=1.0, target_modules="all-linear")
    get_model(build("llama"), config).save_pretrained(tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "stored_params: 13" in out and "trained vectors: 1 of u=13 (weight_tying 1, 14 layers)" in out
