"""Mixed batches of many adapters: each row's factors gathered from the layer's bank of slots, which
keep an adapter's factors while they stay the same (engine/factor_bank.py)."""

import threading

import pytest
import torch

import unilora
from unilora import AdapterConfig, get_model
from unilora.engine.layers import AdaptedLayer

from conftest import VOCAB, build, method_options
from test_adapters import FEW_TARGETS, perturb, row_alone

NAMES = ["a3", "a0", "__base__", "a5", "a1", "a4", "a2", "a3"]


def many_adapter_model():
    """Six adapters "a0".."a5" of ranks 2, 4 and 8 and four methods; the even ones after a0 adapt q/v
    only, so some rows meet layers their adapter skips."""
    model = get_model(build("llama"), AdapterConfig(**{**method_options("unilora"), "rank": 2,
                                                       "target_modules": "all-linear"}), adapter_name="a0")
    for i, method in enumerate(["lora", "unilora", "vblora", "lora", "vera"], start=1):
        targets = "all-linear" if i % 2 else FEW_TARGETS["llama"]
        model.add_adapter(f"a{i}", AdapterConfig(**{**method_options(method), "rank": (2, 4, 8)[i % 3],
                                                    "seed": 20 + i, "target_modules": targets}))
    for i in range(6):
        perturb(model.projections[f"a{i}"], 30 + i)
    return model.eval()


def alone(model, ids, names):
    return torch.cat([row_alone(model, ids, i, n) for i, n in enumerate(names)])


def first_layer(model) -> AdaptedLayer:
    return next(m for m in model.modules() if isinstance(m, AdaptedLayer))


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(5))


def test_a_mix_of_many_adapters_equals_each_row_alone(ids):
    model = many_adapter_model()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        expected = alone(model, ids, NAMES)
        assert sorted(first_layer(model)._bank.held) == ["a0", "a1", "a2", "a3", "a4", "a5"]  # the bank ran
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
        for row in (0, 1, 4):  # every adapter really moves its rows
            assert not torch.allclose(expected[row], row_alone(model, ids, row, "__base__")[0], atol=1e-3)
        # generation, rows of many adapters at once, equals each row generated alone
        prompt, options = ids[:, :4], dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), adapter_names=NAMES,
                                   **options)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    assert torch.equal(generated[i], model.generate(input_ids=prompt[i: i + 1], **options)[0])
            else:
                model.set_adapter(name)
                assert torch.equal(generated[i], model.generate(input_ids=prompt[i: i + 1], **options)[0]), name
    # with gradients on, the batch takes the masked products (the bank holds no autograd graph): same logits
    torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, expected, atol=1e-5, rtol=0)


def test_slots_stay_through_other_forwards_and_follow_changed_factors(ids):
    model = many_adapter_model()
    layer = first_layer(model)
    with torch.no_grad():
        model(input_ids=ids, adapter_names=NAMES)
        bank = layer._bank
        slots = {name: held[2] for name, held in bank.held.items()}
        stack = bank.a
        filled = bank.a[slots["a2"]].clone()
        # a prompt on one adapter (the masked path) and a mix in another order in between: nothing moves
        model(input_ids=ids[:1], adapter_names=["a2"])
        reordered = list(reversed(NAMES))
        torch.testing.assert_close(model(input_ids=ids, adapter_names=reordered).logits, alone(model, ids, reordered),
                                   atol=1e-5, rtol=0)
        assert layer._bank is bank and bank.a is stack
        assert {name: held[2] for name, held in bank.held.items()} == slots
        # an adapter's θ changed in place between two forwards of the same rows: its slot is filled
        # again, and the rows gathered for the first forward are not reused
        model(input_ids=ids, adapter_names=NAMES)
        model.projections["a2"].theta_d.mul_(-2.0)
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        assert not torch.equal(bank.a[slots["a2"]], filled)
        torch.testing.assert_close(mixed, alone(model, ids, NAMES), atol=1e-5, rtol=0)
        # an adapter replaced under the same name gets its new factors
        model.delete_adapter("a1")
        assert "a1" not in bank.held
        model.add_adapter("a1", AdapterConfig(**{**method_options("lora"), "rank": 8, "seed": 77,
                                                 "target_modules": "all-linear"}))
        perturb(model.projections["a1"], 99)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, alone(model, ids, NAMES),
                                   atol=1e-5, rtol=0)


def test_a_forward_of_the_same_rows_reuses_the_rows_gathered_for_the_last(ids):
    model = many_adapter_model()
    with torch.no_grad():
        model(input_ids=ids, adapter_names=NAMES)
        bank = first_layer(model)._bank
        kept = bank._rows
        # the same rows named in a new list (a server's next decode step), after a prompt on other rows
        # (a new request's prefill between two steps): nothing is gathered again
        model(input_ids=ids[:2], adapter_names=["a2", "a0"])
        torch.testing.assert_close(model(input_ids=ids[:, :3], adapter_names=list(NAMES)).logits,
                                   alone(model, ids[:, :3], NAMES), atol=1e-5, rtol=0)
        assert bank._rows is kept
        # other rows through the bank, then the first rows again: gathered for each (a layer keeps one
        # forward's rows), the first rows under the token they had
        model(input_ids=ids, adapter_names=list(reversed(NAMES)))
        assert bank._rows[0] is not kept[0]
        model(input_ids=ids, adapter_names=NAMES)
        assert bank._rows[0] is kept[0] and bank._rows[2][0] is not kept[2][0]
        # the rows repeated (as generate repeats them for num_return_sequences): gathered for that batch
        doubled = ids.repeat_interleave(2, dim=0)
        torch.testing.assert_close(model(input_ids=doubled, adapter_names=NAMES).logits,
                                   alone(model, ids, NAMES).repeat_interleave(2, dim=0), atol=1e-5, rtol=0)
        # an adapter's factors rebuilt (the router dropped its cache): gathered again, from its new factors
        kept = bank._rows
        model.router.binders["a4"].invalidate()
        model(input_ids=ids, adapter_names=NAMES)
        assert bank._rows[0] is not kept[0]


def test_the_least_recently_mixed_adapters_leave_a_full_bank(ids, monkeypatch):
    monkeypatch.setattr(unilora.engine.factor_bank, "BANK_SLOTS", 6)
    model = many_adapter_model()
    for i in range(6, 9):
        model.add_adapter(f"a{i}", AdapterConfig(**{**method_options("lora"), "seed": 40 + i,
                                                    "target_modules": "all-linear"}))
        perturb(model.projections[f"a{i}"], 40 + i)
    model.eval()
    mixes = [["a0", "a1", "a2", "a3", "a4", "a5", "a0", "a1"],
             ["a0", "a1", "a2", "a3", "a4", "a0", "a1", "a2"],  # a5 is now the least recently mixed
             ["a1", "a2", "a3", "a4", "a6", "a1", "a2", "__base__"],  # a6 new: a5 leaves, a0 stays
             ["a4", "a5", "a6", "a7", "a8", "a0", "a1", "__base__"]]  # seven adapters: the bank holds them all
    layer = first_layer(model)
    with torch.no_grad():
        for index, names in enumerate(mixes):
            torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, alone(model, ids, names),
                                       atol=1e-5, rtol=0)
            if index == 2:
                assert sorted(layer._bank.held) == ["a0", "a1", "a2", "a3", "a4", "a6"]
        assert sorted(layer._bank.held) == ["a0", "a1", "a4", "a5", "a6", "a7", "a8"]
        assert layer._bank.a.shape[0] == 8  # slot 0 and seven adapters: slots were reused, not added
        torch.testing.assert_close(model(input_ids=ids, adapter_names=mixes[0]).logits, alone(model, ids, mixes[0]),
                                   atol=1e-5, rtol=0)


def test_a_bank_made_under_inference_mode_takes_new_adapters_outside_it(ids):
    model = many_adapter_model()
    first = ["a0", "a1", "a2", "a3", "a4", "a0", "a1", "a2"]
    with torch.inference_mode():
        model(input_ids=ids, adapter_names=first)
    assert first_layer(model)._bank.a.is_inference()
    with torch.no_grad():  # a5 is new to the bank: its slot is filled outside inference mode
        torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, alone(model, ids, NAMES),
                                   atol=1e-5, rtol=0)
    with torch.inference_mode():  # and back inside it
        torch.testing.assert_close(model(input_ids=ids, adapter_names=first).logits, alone(model, ids, first),
                                   atol=1e-5, rtol=0)


def test_mixes_from_several_threads_each_get_their_own_rows(ids):
    model = many_adapter_model()
    mixes = [NAMES, list(reversed(NAMES)), ["a5", "a4", "a3", "a2", "a1", "a0", "a5", "a4"]]
    with torch.no_grad():
        expected = [alone(model, ids, names) for names in mixes]
    failures = []

    def run(index):
        with torch.no_grad():
            for _ in range(4):
                got = model(input_ids=ids, adapter_names=mixes[index]).logits
                if not torch.allclose(got, expected[index], atol=1e-5, rtol=0):
                    failures.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mixes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
