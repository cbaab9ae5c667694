"""Many adapters on one model: named adapters (PEFT's API), mixed-adapter batches, shared fixed
parts of the projections, and the inference cache bound."""

import copy

import pytest
import torch

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.engine.layers import AdaptedLayer, SavedHead

from conftest import HEADS, ROOT, VOCAB, build, method_options

METHODS = list(unilora.METHODS)
# the second adapter of a pair adapts fewer layers, so some rows meet layers their adapter skips
FEW_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def perturb(projection, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in projection.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def two_adapter_model(arch, first, second, second_head=False):
    """Adapter "a" (method `first`, all linear layers, the arch's head) and "b" (method
    `second`, q/v only, a head only if asked), both with nonzero updates."""
    model = get_model(build(arch), AdapterConfig(**{**method_options(first), "target_modules": "all-linear",
                                                    "modules_to_save": HEADS[arch]}), adapter_name="a")
    model.add_adapter("b", AdapterConfig(**{**method_options(second), "seed": 11, "target_modules": FEW_TARGETS[arch],
                                            "modules_to_save": HEADS[arch] if second_head else []}))
    perturb(model.projections["a"], 1)
    perturb(model.projections["b"], 2)
    if HEADS[arch]:
        with torch.no_grad():  # trained heads that differ from the original and from each other
            for name in ("a", "b") if second_head else ("a",):
                for p in model._head(HEADS[arch][0], name).parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + 5)))
    return model.eval()


def row_alone(model, ids, row, name):
    """Logits of one row run by itself with adapter `name` active (or the base model)."""
    one = ids[row: row + 1]
    if name == unilora.engine.routing.BASE:
        with model.disable_adapter():
            return model(input_ids=one).logits
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return model(input_ids=one).logits
    finally:
        model.set_adapter(previous)


@pytest.fixture
def rows():
    return torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_mixed_batch_equals_each_row_alone(arch, method, rows, path, monkeypatch):
    """Both ways a layer runs a mixed batch: every adapter's columns with the others' zeroed, and (a mix
    of more than MASKED_ADAPTERS adapters) each row's own factors gathered from the layer's bank."""
    if path == "gathered":
        monkeypatch.setattr(unilora.engine.layers, "MASKED_ADAPTERS", 0)
    other = METHODS[(METHODS.index(method) + 1) % len(METHODS)]  # a mix of two methods
    model = two_adapter_model(arch, method, other, second_head=(method == "lora"))
    names = ["a", "b", "__base__", "b", "a"]
    with torch.no_grad():
        mixed = model(input_ids=rows, adapter_names=names).logits
        expected = torch.cat([row_alone(model, rows, i, n) for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    # the rows really differ by adapter (the test would pass trivially if adapters did nothing)
    assert not torch.allclose(expected[0], row_alone(model, rows, 0, "b")[0], atol=1e-3)
    assert not torch.allclose(expected[0], row_alone(model, rows, 0, "__base__")[0], atol=1e-3)


def test_a_layer_keeps_the_concatenated_factors_while_they_stay_the_same(rows):
    model = two_adapter_model("llama", "unilora", "vblora")
    layer = next(m for m in model.modules() if isinstance(m, unilora.engine.layers.AdaptedLayer))
    with torch.no_grad():
        first = model(input_ids=rows, adapter_names=["a", "b", "a", "b", "a"]).logits
        kept = layer._stack_cache[2]
        again = model(input_ids=rows, adapter_names=["a", "a", "b", "b", "b"]).logits  # same adapters, other rows
        assert layer._stack_cache[2] is kept
        model.projections["a"].theta_d.mul_(2.0)  # a changed adapter: its factors are rebuilt, so is the stack
        changed = model(input_ids=rows, adapter_names=["a", "b", "a", "b", "a"]).logits
        assert layer._stack_cache[2] is not kept
    assert torch.equal(first[0], again[0]) and torch.equal(first[3], again[3])
    assert not torch.allclose(first[0], changed[0], atol=1e-4)


def test_mixed_batch_with_gradients_on_and_one_adapter_for_all_rows(rows):
    model = two_adapter_model("llama", "unilora", "vblora")
    mixed = model(input_ids=rows, adapter_names=["b"] * 5).logits  # grad mode on, eval mode
    model.set_adapter("b")
    torch.testing.assert_close(mixed, model(input_ids=rows).logits, atol=1e-5, rtol=0)


def test_mixed_generation_equals_each_row_alone(rows):
    model = two_adapter_model("llama", "unilora", "lora")
    names = ["b", "a", "__base__"]
    prompt = rows[:3, :5]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), adapter_names=names, **options)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=prompt[i: i + 1], **options)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=prompt[i: i + 1], **options)
            assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"
        # beams repeat each row in place: the names follow their rows
        beams = model.generate(input_ids=prompt, adapter_names=names, num_beams=2, **options)
        model.set_adapter("a")
        assert torch.equal(beams[1], model.generate(input_ids=prompt[1:2], num_beams=2, **options)[0])


def test_mixed_batches_refuse_what_they_cannot_run(rows):
    model = two_adapter_model("bert", "lora", "unilora")
    with pytest.raises(UniLoraError, match="does not hold"):
        model(input_ids=rows, adapter_names=["a", "c", "a", "a", "a"])
    with pytest.raises(UniLoraError, match="one adapter name per row"):
        model(input_ids=rows, adapter_names=["a", "b"])
    with pytest.raises(UniLoraError, match="list of adapter names"):
        model(input_ids=rows, adapter_names="a")
    model.train()
    with pytest.raises(UniLoraError, match="model.eval"):
        model(input_ids=rows, adapter_names=["a"] * 5)
    model.eval().merge()
    with pytest.raises(UniLoraError, match="unmerge"):
        model(input_ids=rows, adapter_names=["a"] * 5)
    with pytest.raises(UniLoraError, match="unmerge"):
        model.set_adapter("b")


def test_training_one_adapter_leaves_the_others_untouched(rows):
    model = two_adapter_model("bert", "vblora", "unilora", second_head=True)
    before = {n: {k: v.clone() for k, v in model.adapter_tensors(adapter_name=n).items()} for n in ("a", "b")}
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projections.b.") or ".copies.b." in n for n in trainable)
    model.train()
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-2), lr=1e-2)
    for _ in range(3):
        model(input_ids=rows, labels=torch.tensor([0, 1, 2, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {n: model.adapter_tensors(adapter_name=n) for n in ("a", "b")}
    assert all(torch.equal(before["a"][k], after["a"][k]) for k in before["a"])
    assert any(not torch.equal(before["b"][k], after["b"][k]) for k in before["b"])


def test_adapters_save_and_load_by_name(rows, tmp_path):
    model = two_adapter_model("bert", "vera", "fastfood", second_head=True)
    model.save_pretrained(tmp_path / "b", adapter_name="b")
    model.save_pretrained(tmp_path / "a")  # the active adapter
    with torch.no_grad():
        expected = {n: row_alone(model, rows, 0, n) for n in ("a", "b")}
    loaded = unilora.from_pretrained(build("bert"), tmp_path / "a", adapter_name="first")
    loaded.load_adapter(tmp_path / "b", "second")
    assert loaded.adapters == ["first", "second"] and loaded.active_adapter == "first"
    with torch.no_grad():
        torch.testing.assert_close(row_alone(loaded, rows, 0, "first"), expected["a"], atol=0, rtol=0)
        torch.testing.assert_close(row_alone(loaded, rows, 0, "second"), expected["b"], atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    with pytest.raises(UniLoraError, match="already holds"):
        loaded.load_adapter(tmp_path / "b", "second")


def test_delete_adapter_puts_back_what_only_it_adapted(rows):
    plain = build("llama")
    with torch.no_grad():
        base_logits = plain(input_ids=rows).logits
    model = get_model(plain, AdapterConfig(**{**method_options("lora"), "target_modules": ["q_proj"]}))
    model.add_adapter("wide", AdapterConfig(**{**method_options("unilora"), "target_modules": "all-linear"}))
    assert sum(isinstance(m, AdaptedLayer) for m in plain.modules()) == 14
    with pytest.raises(UniLoraError, match="no adapter named"):
        model.set_adapter("nope")
    model.set_adapter("wide")
    model.delete_adapter("wide")
    assert model.active_adapter == "default" and model.adapters == ["default"]
    assert sum(isinstance(m, AdaptedLayer) for m in plain.modules()) == 2
    assert not any(k.startswith("projections.wide") for k in model.state_dict())
    with pytest.raises(UniLoraError, match="only adapter"):
        model.delete_adapter("default")
    with torch.no_grad():  # the remaining LoRA starts at ΔW = 0: the base model's output
        torch.testing.assert_close(model(input_ids=rows).logits, base_logits, atol=1e-6, rtol=0)


def test_heads_of_several_adapters(rows):
    model = two_adapter_model("bert", "lora", "unilora", second_head=True)
    head = model.model.get_submodule("classifier")
    assert isinstance(head, SavedHead) and set(head.copies) == {"a", "b"}
    model.delete_adapter("a")
    assert set(model.model.get_submodule("classifier").copies) == {"b"}
    with pytest.raises(UniLoraError, match="another adapter adapts"):
        model.add_adapter("c", AdapterConfig(**{**method_options("lora"), "target_modules": ["query"],
                                                "modules_to_save": ["attention.self.value"]}))


def test_merging_a_second_adapter(rows):
    model = two_adapter_model("llama", "unilora", "vera")
    model.set_adapter("b")
    with torch.no_grad():
        unmerged = model(input_ids=rows).logits
        model.merge()
        torch.testing.assert_close(model(input_ids=rows).logits, unmerged, atol=1e-5, rtol=0)
        model.unmerge()
        merged_away = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged_away(input_ids=rows).logits, unmerged, atol=1e-5, rtol=0)
        assert not any(isinstance(m, AdaptedLayer) for m in merged_away.modules())


def test_deepcopy_keeps_adapters_apart(rows):
    model = two_adapter_model("llama", "lora", "unilora")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.projections["b"].theta_d.add_(1.0)
        model.set_adapter("b"), clone.set_adapter("b")
        assert not torch.allclose(model(input_ids=rows).logits, clone(input_ids=rows).logits)
    assert clone.router is not model.router and clone.binder.projection is clone.projections["b"]


@pytest.mark.parametrize("method,fixed", [("unilora", ["indices", "slot_scale"]), ("vera", ["shared_a", "shared_bt"]),
                                          ("fastfood", ["signs", "permutation", "gauss"])])
def test_adapters_of_one_layout_and_seed_share_the_fixed_parts(method, fixed):
    options = {**method_options(method), "target_modules": "all-linear"}
    model = get_model(build("llama"), AdapterConfig(**options))

    def resident() -> int:  # bytes of every distinct storage the adapters hold
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (*model.projections.parameters(), *model.projections.buffers())}
        return sum(storages.values())

    before = resident()
    model.add_adapter("second", AdapterConfig(**options))
    for name in fixed:
        assert getattr(model.projections["second"], name) is getattr(model.projections["default"], name)
    stored = sum(t.numel() * t.element_size() for t in model.projections["second"].stored_tensors().values())
    assert resident() - before <= 1.5 * stored
    model.add_adapter("other-seed", AdapterConfig(**{**options, "seed": 99}))
    assert getattr(model.projections["other-seed"], fixed[0]) is not getattr(model.projections["default"], fixed[0])


def test_inference_caches_stay_within_their_bound(rows):
    # methods whose reconstruction allocates (LoRA's and VeRA's factors are views of their own tensors)
    model = two_adapter_model("llama", "unilora", "fastfood")
    model.add_adapter("c", AdapterConfig(**{**method_options("vblora"), "target_modules": "all-linear"}))
    perturb(model.projections["c"], 3)
    with torch.no_grad():
        expected = {n: row_alone(model, rows, 0, n) for n in ("a", "b", "c")}
        model.router.cache_limit_bytes = 1  # keep only the adapters the current forward uses
        for name in ("a", "b", "c", "a"):
            torch.testing.assert_close(model(input_ids=rows[:1], adapter_names=[name]).logits, expected[name],
                                       atol=1e-5, rtol=0)
            cached = [n for n, b in model.router.binders.items() if b.cached_bytes()]
            assert cached == [name]


def test_adapter_names_are_checked():
    model = get_model(build("llama"), AdapterConfig(**{**method_options("lora"), "target_modules": ["q_proj"]}))
    for bad in ("", "a.b", "__base__", 3):
        with pytest.raises(UniLoraError, match="not allowed"):
            model.add_adapter(bad, AdapterConfig(**{**method_options("lora"), "target_modules": ["q_proj"]}))
    with pytest.raises(UniLoraError, match="already holds"):
        model.add_adapter("default", AdapterConfig(**{**method_options("lora"), "target_modules": ["q_proj"]}))


def test_readme_many_adapters_snippet_runs(tmp_path, monkeypatch):
    """The README's "Many adapters on one base" snippet, run as written."""

    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("### Many adapters on one base", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.adapters == ["alice", "carol"] and (tmp_path / "adapters" / "carol" / "adapter_config.json").is_file()
    assert namespace["logits"].shape == (3, 8, 96) and namespace["out"].shape == (3, 16)


def test_a_failed_load_adapter_leaves_the_model_as_it_was(rows, tmp_path):
    from conftest import edit_adapter_config

    options = {**method_options("unilora"), "target_modules": "all-linear"}
    get_model(build("llama"), AdapterConfig(**options)).save_pretrained(tmp_path / "other")
    edit_adapter_config(tmp_path / "other", lambda meta: meta["projection"].update(index_sha256="0" * 16))
    model = get_model(build("llama"), AdapterConfig(**{**method_options("lora"), "target_modules": ["q_proj"]}))
    with torch.no_grad():
        before = model(input_ids=rows).logits
    with pytest.raises(UniLoraError, match="seeded projection differs"):
        model.load_adapter(tmp_path / "other", "other")
    assert model.adapters == ["default"] and list(model.projections) == ["default"]
    assert sum(isinstance(m, AdaptedLayer) for m in model.modules()) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=rows).logits, before)
