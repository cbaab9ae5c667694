"""AdaptedModel.merged_copies(): no-grad forwards with one adapter run each plain linear layer as one
product with W + s·B A, the base weights untouched. Its outputs must be the merged model's, and the
copies must follow everything that changes what the unmerged model computes."""

import copy

import pytest
import torch

import unilora
from unilora import AdapterConfig, get_model
from unilora.engine.layers import AdaptedLayer

from conftest import HEADS, VOCAB, build, logits_of, method_options

METHODS = list(unilora.METHODS)


def adapted(arch, method, seed=0, **overrides):
    options = method_options(method)
    options.update(target_modules="all-linear", modules_to_save=HEADS[arch], seed=seed, **overrides)
    model = get_model(build(arch), AdapterConfig(**options))
    perturb(model.projection, seed + 1)
    return model.eval()


def perturb(projection, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in projection.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def built_copies(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, AdaptedLayer) and m.merged_copy is not None
               and m.merged_copy.built is not None)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_merged_copies_give_the_merged_models_outputs(arch, method, ids):
    model = adapted(arch, method)
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    with torch.no_grad():
        unmerged = logits_of(model, ids)
        with model.merged_copies():
            inside = logits_of(model, ids)
            linear = sum(1 for m in model.modules() if isinstance(m, AdaptedLayer) and type(m.base_layer) is torch.nn.Linear)
            assert built_copies(model) == linear  # every plain linear layer ran its copy (GPT-2's Conv1D: none)
        after = logits_of(model, ids)
        merged = copy.deepcopy(model)
        merged.merge()
        merged_logits = logits_of(merged, ids)
    assert built_copies(model) == 0 and all(m.merged_copy is None for m in model.modules() if isinstance(m, AdaptedLayer))
    for n, p in model.get_base_model().named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(after, unmerged)
    if arch == "gpt2":  # Conv1D layers keep the unmerged path
        assert torch.equal(inside, unmerged)
    else:
        assert torch.equal(inside, merged_logits)
        assert not torch.equal(inside, unmerged)  # it ran the copies, not the unmerged products
    assert torch.allclose(inside, unmerged, atol=1e-5, rtol=1e-4)


def test_merged_copies_follow_theta_the_active_adapter_and_the_base_weight(ids):
    model = adapted("llama", "unilora")
    model.add_adapter("b", AdapterConfig(**{**method_options("vera"), "target_modules": ["q_proj", "v_proj"], "seed": 5}))
    perturb(model.projections["b"], 9)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer) and "b" in m.adapters)

    def unmerged(**inputs):
        """The logits the model gives with the block's copies set aside (the unmerged path)."""
        copies = {m: m.merged_copy for m in model.modules() if isinstance(m, AdaptedLayer)}
        for m in copies:
            m.merged_copy = None
        try:
            return model(input_ids=ids, **inputs).logits
        finally:
            for m, kept in copies.items():
                m.merged_copy = kept

    def same(reference):
        got = logits_of(model, ids)
        assert torch.allclose(got, reference, atol=1e-5, rtol=1e-4)
        return got

    with torch.no_grad(), model.merged_copies():
        first = same(unmerged())
        model.set_adapter("b")
        second = same(unmerged())
        assert (second - first).abs().max() > 1e-2
        perturb(model.projections["b"], 10)  # θ changed in place
        third = same(unmerged())
        assert (third - second).abs().max() > 1e-2
        model.projections["b"].load_state_dict({k: v * 0.5 for k, v in model.projections["b"].state_dict().items()})
        fourth = same(unmerged())
        assert (fourth - third).abs().max() > 1e-2
        layer.base_layer.weight.mul_(4.0)  # the base weight changed in place
        fifth = same(unmerged())
        assert (fifth - fourth).abs().max() > 1e-3
        with model.disable_adapter():
            base = logits_of(model, ids)
        with model.disable_adapter():
            assert torch.equal(unmerged(), base)
        names = ["default", "b", "__base__", "b"][: ids.shape[0]]
        mixed = model(input_ids=ids, adapter_names=names).logits
        assert torch.equal(unmerged(adapter_names=names), mixed)  # mixed rows: the same path
        with model.merged_copies():  # a nested block keeps the outer one's copies
            same(unmerged())
        assert built_copies(model) > 0


def test_training_inside_merged_copies_takes_the_unmerged_path_and_the_copies_see_each_step(ids):
    model = adapted("llama", "unilora")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer_ref = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    with model.merged_copies():
        for _ in range(2):
            with torch.no_grad():
                assert torch.allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-5, rtol=1e-4)
            for m, opt in ((model, optimizer), (reference, optimizer_ref)):
                m.train()
                logits_of(m, ids).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                m.eval()
            for p, q in zip(model.projection.parameters(), reference.projection.parameters()):
                assert torch.equal(p, q)  # the same gradients: the copies took no part in training
        with torch.no_grad():
            assert torch.allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-5, rtol=1e-4)


def test_generation_inside_merged_copies_equals_the_merged_model():
    model = adapted("llama", "unilora")
    merged = copy.deepcopy(model)
    merged.merge()
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), model.merged_copies():
        tokens = model.generate(input_ids=prompt, **options)
        snapshot = copy.deepcopy(model)  # a copy made inside the block carries no merged copy
    assert all(m.merged_copy is None for m in snapshot.modules() if isinstance(m, AdaptedLayer))
    assert torch.equal(tokens, merged.generate(input_ids=prompt, **options))
    assert torch.equal(snapshot.generate(input_ids=prompt, **options), model.generate(input_ids=prompt, **options))


def test_merged_copies_in_bfloat16_equal_the_merged_model(ids):
    model = adapted("llama", "lora").to(torch.bfloat16)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        merged.merge()
        with model.merged_copies():
            assert torch.equal(logits_of(model, ids), logits_of(merged, ids))


def test_a_cast_or_a_loaded_base_inside_the_block_rebuilds_the_copies(ids):
    model = adapted("llama", "unilora")
    state = {k: v + 0.01 for k, v in model.get_base_model().state_dict().items() if "layers.0.self_attn" in k}
    with torch.no_grad(), model.merged_copies():
        logits_of(model, ids)
        model.get_base_model().to(torch.bfloat16)  # θ's factors stay; each weight's .data is replaced
        merged = copy.deepcopy(model)
        merged.merge()
        assert torch.equal(logits_of(model, ids), logits_of(merged, ids))
        model.get_base_model().to(torch.float32)
        logits_of(model, ids)
        model.get_base_model().load_state_dict(state, strict=False)  # copied in place: the version changes
        merged = copy.deepcopy(model)
        merged.merge()
        assert torch.equal(logits_of(model, ids), logits_of(merged, ids))
