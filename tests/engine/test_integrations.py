"""Works wherever PEFT works: gradient checkpointing (both modes), DDP with and without
static_graph, deepcopy / pickle / torch.save, transformers.Trainer, TRL, heads under
disable_adapter, a cache that is never stale, threads, and low-precision merging."""

import copy
import io
import pickle
import threading
import warnings

import pytest
import torch

import unilora
from unilora import AdapterConfig, UniLoraError, get_model

from conftest import HEADS, build, logits_of, method_options
from ranks import init_gloo, leave_rank, run_ranks

METHODS = list(unilora.METHODS)


def adapted(arch, method, seed=0, **overrides):
    options = {**method_options(method), "target_modules": "all-linear", "modules_to_save": HEADS[arch], **overrides}
    model = get_model(build(arch, seed), AdapterConfig(**options))
    with torch.no_grad():  # non-trivial adapter values (several methods start at ΔW = 0)
        for p in model.projection.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    for module in model.modules():  # deterministic: checkpointing must reproduce the same forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def batch(arch, rows=2):
    ids = torch.randint(0, 96, (rows, 9), generator=torch.Generator().manual_seed(1))
    labels = ids if arch in ("llama", "gpt2") else torch.arange(rows) % 2
    return ids, labels


def accumulated_grads(model, arch, passes=2):
    """Gradients of `passes` backward passes (gradient accumulation) on the same batch."""
    ids, labels = batch(arch)
    for _ in range(passes):
        model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradient_checkpointing_both_modes_equals_no_checkpointing(arch, method):
    reference = accumulated_grads(adapted(arch, method), arch)
    for reentrant in (True, False):
        model = adapted(arch, method)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        reruns = []
        model.get_base_model().get_submodule(model.layout.slots[0].name).register_forward_hook(lambda *a: reruns.append(1))
        grads = accumulated_grads(model, arch)
        assert len(reruns) == 4, "each of the 2 passes runs the first block twice (forward + recompute)"
        assert grads.keys() == reference.keys()
        for name in reference:
            assert torch.allclose(grads[name], reference[name], rtol=1e-6, atol=1e-6), (reentrant, name)


# --- DDP: two gloo ranks on half batches equal one process on the full batch -------------
DDP_CASES = [(method, static, reentrant) for method in METHODS for static in (False, True) for reentrant in (True, False)]


def _ddp_train(method, reentrant, wrapper_kwargs=None, rows=slice(0, 4)):
    model = adapted("llama", method)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    runner = torch.nn.parallel.DistributedDataParallel(model, **wrapper_kwargs) if wrapper_kwargs is not None else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, labels = batch("llama", rows=4)
    for _ in range(2):
        runner(input_ids=ids[rows], labels=labels[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_rank(rank, world, init_file, out_file):
    init_gloo(rank, world, init_file)
    results = {}
    for method, static, reentrant in DDP_CASES:
        results[(method, static, reentrant)] = _ddp_train(method, reentrant, {"static_graph": static},
                                                          slice(2 * rank, 2 * rank + 2))
    if rank == 0:
        torch.save(results, out_file)
    leave_rank()  # the rank ends here


@pytest.mark.slow
def test_ddp_with_checkpointing_matches_one_process_with_and_without_static_graph(tmp_path):
    out_file = tmp_path / "ddp.pt"
    run_ranks(_ddp_rank, lambda attempt: (2, str(tmp_path / f"init{attempt}"), str(out_file)))
    results = torch.load(out_file)
    for case in DDP_CASES:
        single = _ddp_train(case[0], reentrant=None)  # one process, no checkpointing
        for name, value in single.items():
            assert torch.allclose(results[case][name], value, atol=1e-5), (case, name)


# --- copies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["unilora", "vblora", "lora", "lora_xs", "tinylora"])
def test_deepcopy_pickle_and_torch_save_give_independent_working_models(method):
    model = adapted("bert", method)
    ids, labels = batch("bert")
    model(input_ids=ids, labels=labels).loss.backward()  # a forward's state must not be copied
    model.zero_grad()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    model.eval()
    expected = logits_of(model, ids)
    for clone in copies:
        assert clone.binder is not model.binder and clone.binder.projection is clone.projection
        clone.eval()
        assert torch.equal(logits_of(clone, ids), expected)
        clone.train()
        optimizer = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):  # gradient accumulation on the copy
            clone(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        assert all(p.grad is None for p in model.parameters()), "the copy's backward reached the original"
        assert not torch.equal(clone.eval()(input_ids=ids).logits, expected)
        for n, p in model.named_parameters():
            assert torch.equal(p, original[n]), n


# --- heads and disable_adapter ----------------------------------------------------------------
def test_disable_adapter_gives_the_base_model_with_a_trained_head():
    reference = build("bert", 0)
    ids, labels = batch("bert")
    expected = logits_of(reference, ids)
    model = adapted("bert", "unilora")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.allclose(model.get_base_model().classifier.weight, reference.classifier.weight), "head trained"
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), expected)
    plain = model.merge_and_unload()
    assert isinstance(plain.classifier, torch.nn.Linear), "merge_and_unload hands back the trained head itself"


# --- the eval cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["unilora", "vblora", "fastfood", "tied_lora"])
def test_eval_cache_never_serves_stale_factors(method, tmp_path):
    model = adapted("llama", method).eval()
    ids, _ = batch("llama")

    def fresh_logits():
        twin = adapted("llama", method).eval()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            return logits_of(twin, ids)

    with torch.no_grad():
        logits_of(model, ids)  # fills the cache
        for p in model.projection.parameters():  # .data edits bypass the version counters
            p.data.mul_(1.5)
        assert torch.equal(logits_of(model, ids), fresh_logits())
        model.load_state_dict(adapted("llama", method, seed=0).state_dict())
        assert torch.equal(logits_of(model, ids), fresh_logits())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), ids), fresh_logits())
        model.to(torch.float64)
        assert torch.allclose(logits_of(model, ids).float(), fresh_logits(), atol=1e-4)


def test_vblora_loaded_from_topk_then_converted_to_float64(tmp_path):
    model = adapted("bert", "vblora").eval()
    ids, _ = batch("bert")
    model.save_pretrained(tmp_path / "a")
    loaded = unilora.from_pretrained(build("bert"), tmp_path / "a").to(torch.float64)
    with torch.no_grad():
        assert torch.allclose(logits_of(loaded, ids).float(), logits_of(model, ids), atol=1e-4)


@pytest.mark.parametrize("selection", ["noisy_topk", "gumbel"])
def test_stochastic_selection_merges_the_stored_selection(selection):
    model = adapted("bert", "vblora", selection=selection, store="logits" if selection == "gumbel" else "topk")
    ids, _ = batch("bert")
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    with torch.no_grad():
        expected = logits_of(model.eval(), ids)
        model.train()
        model.merge()  # in train mode: must still merge the deterministic selection
        merged = logits_of(model.eval(), ids)
        assert torch.allclose(merged, expected, atol=1e-5)
        model.train()
        model.unmerge()
    for n, p in model.get_base_model().named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n


# --- threads ----------------------------------------------------------------------------------
def test_training_thread_and_no_grad_thread_on_one_model():
    model = adapted("llama", "unilora")
    ids, _ = batch("llama")
    with torch.no_grad():
        expected = logits_of(copy.deepcopy(model).eval(), ids)
    errors, outputs = [], []
    stop = threading.Event()

    def infer():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outputs.append(model(input_ids=ids).logits)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    reader = threading.Thread(target=infer)
    reader.start()
    try:
        for _ in range(10):  # gradients only, no step: the reader's outputs must stay exact
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        stop.set()
        reader.join()
    assert not errors, errors
    assert outputs and all(torch.allclose(o, expected, atol=1e-6) for o in outputs)
    assert model.projection.theta_d.grad is not None


# --- low precision ----------------------------------------------------------------------------
def test_bf16_merge_is_computed_in_fp32_and_unmerge_warns_once():
    model = adapted("llama", "unilora").eval()
    ids, _ = batch("llama")
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    model.to(torch.bfloat16)
    with torch.no_grad():
        unmerged = logits_of(model, ids).float()
        model.merge()
        merged = logits_of(model, ids).float()
    assert (merged - unmerged).abs().max() < 0.1 * unmerged.abs().max()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unmerge()
        model.merge()
        model.unmerge()
    assert len([w for w in caught if "cannot restore them exactly" in str(w.message)]) == 1
    model.to(torch.float32)
    model.merge()
    model.unmerge()  # fp32: no warning, weights back within rounding
    for n, p in model.get_base_model().named_parameters():
        assert torch.allclose(p, before[n].to(torch.bfloat16).float(), atol=2e-2), n


def test_two_threads_training_one_model_is_refused():
    model = adapted("llama", "unilora")
    ids, _ = batch("llama")
    entered, release, errors = threading.Event(), threading.Event(), []

    def slow_hook(module, args, output):
        entered.set()
        release.wait(10)

    handle = model.get_base_model().model.layers[0].register_forward_hook(slow_hook)
    first = threading.Thread(target=lambda: model(input_ids=ids, labels=ids))
    first.start()
    entered.wait(10)
    handle.remove()
    try:
        with pytest.raises(UniLoraError, match="another thread is running a training forward"):
            model(input_ids=ids, labels=ids)
    finally:
        release.set()
        first.join()
    assert not errors
