"""The wrapped model, for every method on tiny BERT, RoBERTa, GPT-2 (Conv1D) and Llama configs."""

import json

import pytest
import torch

import unilora
from unilora import AdapterConfig, LayoutMismatchError, UniLoraError, get_model
from unilora.engine.layers import AdaptedLayer

from conftest import HEADS, build, edit_adapter_config, logits_of, method_options

ARCH_NAMES = ["bert", "roberta", "gpt2", "llama"]
METHODS = list(unilora.METHODS)


def adapted(arch, method, seed=0, **overrides):
    options = method_options(method)
    options.update(target_modules="all-linear", modules_to_save=HEADS[arch])
    options.update(overrides)
    return get_model(build(arch, seed), AdapterConfig(**options))


def perturb(model):
    """Give the adapter non-trivial values (several methods start with ΔW = 0)."""
    with torch.no_grad():
        for p in model.projection.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)


def adapter_tensors_equal(a, b):
    ta, tb = a.adapter_tensors(), b.adapter_tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_unmerged_and_unmerge_restores(arch, method, ids):
    model = adapted(arch, method).eval()
    perturb(model)
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    unmerged = logits_of(model, ids)
    with model.disable_adapter():
        base = logits_of(model, ids)
    scale = base.abs().max()
    assert (unmerged - base).abs().max() > 1e-2 * scale, "the perturbed adapter must change the output"
    model.merge()
    assert (logits_of(model, ids) - unmerged).abs().max() <= 1e-4 * scale + 1e-6
    model.unmerge()
    for n, p in model.get_base_model().named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n
    assert torch.allclose(logits_of(model, ids), unmerged, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_inference_path_equals_the_training_path(arch, method, ids):
    """Without gradients a layer adds s·(xAᵀ)Bᵀ into the base output with one fused addmm; the
    result must be the one the differentiable path computes."""
    model = adapted(arch, method).eval()
    perturb(model)
    with torch.no_grad():
        fused = logits_of(model, ids)
    differentiable = logits_of(model, ids)  # gradients on: the general path
    assert differentiable.requires_grad
    assert torch.allclose(fused, differentiable.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_gives_the_base_model(arch, method, ids):
    reference = build(arch, seed=0)
    expected = logits_of(reference, ids)
    model = adapted(arch, method)
    perturb(model)
    with model.disable_adapter():
        assert torch.allclose(logits_of(model, ids), expected, atol=1e-6)
    assert not torch.allclose(logits_of(model, ids), expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_outputs(arch, method, ids, tmp_path):
    model = adapted(arch, method)
    perturb(model)
    for head in model.head_parameters().values():
        with torch.no_grad():
            head.add_(0.5)
    model.eval()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = unilora.from_pretrained(build(arch, seed=0), tmp_path / "adapter")
    assert torch.equal(logits_of(loaded, ids), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference by default"


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_adapter_and_head(method, ids):
    model = adapted("bert", method).train()
    frozen = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.projection.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-2), lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.get_base_model().named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
    changed = [n for n, p in model.projection.named_parameters() if not torch.equal(p, adapter[n])]
    assert changed, "training must move the adapter"
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("projections.default.") or ".classifier." in n for n in trainable_names)


@pytest.mark.parametrize("arch", ["roberta", "gpt2"])
def test_vera_scaled_activations_match_the_dense_factors(arch, ids, monkeypatch):
    """Layers scale activations by VeRA's vectors; outputs and gradients equal those of A_l, Bᵀ_l formed in full."""
    model = adapted(arch, "vera", dropout=0.0)
    perturb(model)
    model.train()

    def output_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same base-model dropout masks in both passes
        out = logits_of(model, ids)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    scaled_out, scaled_grads = output_and_grads()
    monkeypatch.setattr(model.projection, "layer_factors", model.projection.factors)
    dense_out, dense_grads = output_and_grads()
    assert torch.allclose(scaled_out, dense_out, atol=1e-5)
    assert scaled_grads.keys() == dense_grads.keys() and "projections.default.scales" in scaled_grads
    for name in scaled_grads:  # float32 sums in another order: errors relative to the gradient's size
        scale = float(dense_grads[name].abs().max())
        torch.testing.assert_close(scaled_grads[name], dense_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_one_reconstruction_per_forward_and_cached_eval(ids, monkeypatch):
    model = adapted("llama", "unilora")
    calls = []
    original = model.projection.factors_from
    monkeypatch.setattr(model.projection, "factors_from", lambda t: calls.append(1) or original(t))
    model.train()
    logits_of(model, ids).sum().backward()
    assert len(calls) == 1, f"{len(model.layout)} layers but one reconstruction"
    model.eval()
    with torch.no_grad():
        first = logits_of(model, ids)
        logits_of(model, ids)
    assert len(calls) == 2, "eval without grad reuses the cached factors"
    with torch.no_grad():
        model.projection.theta.add_(0.1)  # an optimizer step bumps the version counter
        assert not torch.equal(logits_of(model, ids), first)
    assert len(calls) == 3


def test_generation_uses_the_adapter(ids):
    model = adapted("gpt2", "unilora").eval()
    perturb(model)
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    merged = adapted("gpt2", "unilora").eval()
    merged.load_state_dict(model.state_dict())
    base = merged.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert not base._forward_pre_hooks and not base._forward_hooks, "the plain model keeps no adapter hooks"
    assert torch.equal(base.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0), out)


def test_targeting_by_suffix_regex_and_all_linear():
    by_suffix = adapted("bert", "lora", target_modules=["query", "value"])
    assert [s.name.split(".")[-1] for s in by_suffix.layout.slots] == ["query", "value"] * 2
    by_regex = adapted("bert", "lora", target_modules=r".*layer\.1\.attention\.self\.(key|value)")
    assert [s.name for s in by_regex.layout.slots] == [
        "bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]
    everything = adapted("bert", "lora", target_modules="all-linear")
    names = [s.name for s in everything.layout.slots]
    assert len(names) == 12 and not any("classifier" in n or "pooler" in n for n in names)
    gpt2 = adapted("gpt2", "lora", target_modules="all-linear")
    assert {s.name.split(".")[-1] for s in gpt2.layout.slots} == {"c_attn", "c_proj", "c_fc"}


def test_bad_targets_say_what_exists():
    with pytest.raises(UniLoraError, match="matched no linear layer.*query"):
        adapted("bert", "lora", target_modules=["qkv_proj"])
    with pytest.raises(UniLoraError, match="regex"):
        adapted("bert", "lora", target_modules="(unclosed")
    with pytest.raises(UniLoraError, match="unknown method"):
        AdapterConfig(method="dora")
    # a relation between two fields is refused with the config, before any model or data is touched
    with pytest.raises(UniLoraError, match="zero_delta' needs theta_dim >= 2"):
        AdapterConfig(method="unilora", init="zero_delta", theta_dim=1)


def test_loading_onto_a_different_layout_is_refused(tmp_path):
    model = adapted("bert", "unilora", target_modules=["query", "value"])
    model.save_pretrained(tmp_path / "a")
    other = build("roberta")  # different module names
    with pytest.raises(LayoutMismatchError, match="adapts layer 'bert.encoder"):
        unilora.from_pretrained(other, tmp_path / "a")
    from conftest import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(LayoutMismatchError, match="48x48 here but 32x32"):
        unilora.from_pretrained(wider, tmp_path / "a")


def test_unilora_refuses_an_adapter_whose_seeded_draw_differs(tmp_path):
    model = adapted("bert", "unilora")
    model.save_pretrained(tmp_path / "a")
    edit_adapter_config(tmp_path / "a", lambda meta: meta["projection"].update(index_sha256="0" * 16))
    with pytest.raises(UniLoraError, match="seeded projection differs"):
        unilora.from_pretrained(build("bert"), tmp_path / "a")


def test_adapter_file_holds_theta_d_and_the_layout(tmp_path):
    from safetensors.torch import load_file

    model = adapted("bert", "unilora", target_modules=["query", "value"], modules_to_save=[])
    model.save_pretrained(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert list(tensors) == ["unilora.theta_d"] and tensors["unilora.theta_d"].shape == (300,)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["adapter"]["seed"] == 3 and meta["D"] == model.layout.D and len(meta["layout"]) == 4
    assert model.stored_bytes() == 300 * 4


def test_save_is_atomic(tmp_path, monkeypatch):
    model = adapted("bert", "lora")
    model.save_pretrained(tmp_path / "a")
    good = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    perturb(model)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("unilora.store.io.save_file", explode)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "a")
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no half-written directories left behind"


def test_bad_adapter_directories_give_clear_errors(tmp_path):
    with pytest.raises(UniLoraError, match="does not exist"):
        unilora.from_pretrained(build("bert"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UniLoraError, match="adapter_config.json is missing"):
        unilora.from_pretrained(build("bert"), tmp_path / "empty")


def test_vblora_topk_adapter_resumes_training(tmp_path, ids):
    model = adapted("bert", "vblora")
    perturb(model)
    model.eval()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "a")
    resumed = unilora.from_pretrained(build("bert"), tmp_path / "a", is_trainable=True)
    assert torch.allclose(logits_of(resumed.eval(), ids), expected, atol=1e-5)
    resumed.train()
    optimizer = torch.optim.AdamW(resumed.parameter_groups(lr=1e-3, group_lrs={"logits": 1e-2}))
    assert {g["name"] for g in optimizer.param_groups} == {"bank", "logits", "head"}
    bank_before = resumed.projection.bank.detach().clone()
    resumed(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert resumed.projection.logits.grad.abs().max() > 0, "logits rebuilt from top-k still learn"
    optimizer.step()
    assert not torch.equal(resumed.projection.bank, bank_before)


def test_vblora_logits_storage_is_exact(tmp_path, ids):
    model = adapted("bert", "vblora", store="logits")
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    loaded = unilora.from_pretrained(build("bert"), tmp_path / "a", is_trainable=True)
    assert torch.equal(loaded.projection.logits, model.projection.logits)


def test_parameter_groups_reject_unknown_names():
    model = adapted("bert", "unilora")
    groups = model.parameter_groups(lr=1e-3, group_lrs={"theta": 5e-3, "head": 1e-2})
    assert {g["name"]: g["lr"] for g in groups} == {"theta": 5e-3, "head": 1e-2}
    with pytest.raises(UniLoraError, match="unknown groups"):
        model.parameter_groups(lr=1e-3, group_lrs={"bank": 1e-3})


def test_adapting_twice_is_refused():
    model = adapted("bert", "lora")
    with pytest.raises(UniLoraError, match="already carries"):
        get_model(model.get_base_model(), AdapterConfig(method="lora"))


def test_disable_while_merged_is_refused():
    model = adapted("bert", "lora")
    model.merge()
    with pytest.raises(UniLoraError, match="unmerge"):
        with model.disable_adapter():
            pass


def test_vblora_picks_a_vector_length_that_divides_every_layer(tmp_path):
    from conftest import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # SmolLM2's widths: hidden 576, k/v projections 192, FFN 1536
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64))
    with pytest.warns(UserWarning, match="using b=192"):
        model = get_model(base, AdapterConfig(method="vblora", rank=2, num_vectors=8, target_modules="all-linear"))
    assert model.adapter_config.vector_length == 192 and model.projection.bank.shape == (8, 192)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["adapter"]["vector_length"] == 192
    assert unilora.from_pretrained(LlamaForCausalLM(base.config), tmp_path / "a").adapter_config.vector_length == 192
