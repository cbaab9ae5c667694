"""Every method on a quantized base (QLoRA's setup): torchao int8 and int4 weight-only, bitsandbytes
nf4 where it is installed. The adapter trains beside the quantized matmul, merges (quantized again as
the base was, with the error measured, or in full precision), unmerges to the quantized weights bit for bit, saves and loads to the same outputs,
mixes rows of several adapters, and exports to a PEFT LoRA that PEFT runs on the same base."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import unilora
from unilora.cli import main
from unilora.core.quantized import layer_quantization
from unilora.core.targeting import is_quantized
from unilora.engine.layers import AdaptedLayer
from unilora.models.quantization import quantization_of, quantize_model

METHODS = ["lora", "unilora", "vblora", "vera", "tied_lora", "fastfood", "lora_xs", "tinylora"]
OPTIONS = dict(theta_dim=300, num_vectors=12, vector_length=16, topk=2)
TARGETS = ["q_proj", "v_proj", "up_proj"]
KINDS = ["int8", "int4"] + (["nf4"] if importlib.util.find_spec("bitsandbytes") else [])

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")


def tiny_base(kind: str | None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval()
    return quantize_model(base, kind) if kind else base


def randomized(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def test_bitsandbytes_is_tested_where_it_is_installed():
    if "nf4" not in KINDS:
        pytest.skip("bitsandbytes is not installed here (125 MB installed, so the CI install leaves it out; "
                    "pip install \"unilora[quant]\" adds it)")
    assert quantization_of(tiny_base("nf4")) == "nf4"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_merges_and_reloads_on_a_quantized_base(kind, method, tmp_path):
    base = tiny_base(kind)
    assert quantization_of(base) == kind
    model = randomized(unilora.get_model(base, unilora.AdapterConfig(method=method, target_modules=TARGETS, rank=4,
                                                                     **OPTIONS)), 0)
    layer = base.model.layers[0].self_attn.q_proj
    assert is_quantized(layer.base_layer.weight)  # the quantized matmul stays; the adapter is beside it

    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.zero_grad()
    model.eval()

    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        quantized = layer.base_layer.weight
        model.merge(to="float32")
        assert not is_quantized(layer.base_layer.weight)  # a full-precision copy holds W + ΔW
        merged = model(input_ids=IDS).logits
        model.unmerge()
        assert layer.base_layer.weight is quantized  # the very quantized tensor is back
        again = model(input_ids=IDS).logits
    # bitsandbytes' CPU kernel repacks its weights on the first forward in eval mode (its own rounding)
    assert (merged - unmerged).abs().max() < (5e-3 if kind == "nf4" else 1e-4)
    assert torch.equal(again, unmerged)

    model.save_pretrained(tmp_path / "adapter")
    loaded = unilora.from_pretrained(tiny_base(kind), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, unmerged)


@pytest.mark.parametrize("kind", KINDS)
def test_a_merge_quantizes_again_and_measures_what_that_added(kind):
    base = tiny_base(kind)
    model = randomized(unilora.get_model(base, unilora.AdapterConfig(method="unilora", target_modules=TARGETS, rank=4,
                                                                     **OPTIONS)), 0).eval()
    layer = base.model.layers[0].self_attn.q_proj
    quantized = layer.base_layer.weight
    seen = []
    hook = layer.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        hook.remove()
        report = model.merge(check={"input_ids": IDS})
        assert layer_quantization(layer.base_layer) == kind  # stored as the base was
        merged = model(input_ids=IDS).logits
        x, y = seen[0]
        layer_diff = (layer(x) - y).abs().max().item()
    # the report is what the merged model gives, not an estimate
    assert report.output_max_abs == pytest.approx((merged - unmerged).abs().max().item(), rel=1e-6)
    assert 0 < layer_diff <= report.layer_max_abs
    assert 0 < report.layer_relative < (0.02 if kind == "int8" else 0.2)
    assert report.worst_layer in dict(base.named_modules())
    assert report.line().startswith("merging changed the adapted layers' outputs by at most ")
    with torch.no_grad():
        model.unmerge()
        assert layer.base_layer.weight is quantized
        assert torch.equal(model(input_ids=IDS).logits, unmerged)
        full = model.merge(to="float32", check={"input_ids": IDS})  # no re-quantizing: rounding only
        assert not is_quantized(layer.base_layer.weight)
        exact = 5e-3 if kind == "nf4" else 1e-5  # bitsandbytes' packed CPU kernel rounds on its own (see above)
        assert full.layer_max_abs < exact and full.output_max_abs < exact
        model.unmerge()
        plain = model.merge_and_unload(to="bfloat16")  # the whole model, for writing out
        assert all(p.dtype == torch.bfloat16 for p in plain.parameters())
        assert not any(is_quantized(m.weight) for m in plain.modules() if isinstance(m, torch.nn.Linear))
        assert (plain(input_ids=IDS).logits.float() - unmerged).abs().max() < 0.1
    with pytest.raises(unilora.UniLoraError, match="merge to 'int3': choose one of float32, bfloat16, float16"):
        unilora.get_model(tiny_base(kind), unilora.AdapterConfig(target_modules=TARGETS, **OPTIONS)).merge(to="int3")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_mixed_rows_on_a_quantized_base_equal_each_adapter_alone(kind):
    base = tiny_base(kind)
    model = unilora.get_model(base, unilora.AdapterConfig(method="unilora", target_modules=TARGETS, rank=4,
                                                          **OPTIONS), adapter_name="a")
    model.add_adapter("b", unilora.AdapterConfig(method="vblora", target_modules=TARGETS, rank=4, **OPTIONS))
    model.add_adapter("c", unilora.AdapterConfig(method="lora_xs", target_modules=TARGETS, rank=4))
    for name in ("a", "b", "c"):
        model.set_adapter(name)
        randomized(model, ord(name))
    model.eval()
    with torch.no_grad():
        rows = model(input_ids=IDS.repeat(2, 1)[:3], adapter_names=["a", "b", "c"]).logits
        for i, name in enumerate(("a", "b", "c")):
            model.set_adapter(name)
            alone = model(input_ids=IDS.repeat(2, 1)[i : i + 1]).logits
            assert (rows[i] - alone[0]).abs().max() < 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
def test_merged_copies_leave_a_quantized_base_on_its_unmerged_path(kind):
    config = unilora.AdapterConfig(method="unilora", target_modules=TARGETS, rank=4, **OPTIONS)
    model = randomized(unilora.get_model(tiny_base(kind), config), 3).eval()
    with torch.no_grad():
        outside = model(input_ids=IDS).logits
        with model.merged_copies():
            assert torch.equal(model(input_ids=IDS).logits, outside)
            assert not [m for m in model.modules() if isinstance(m, AdaptedLayer) and m.merged_copy is not None]


def test_export_runs_in_peft_on_the_same_torchao_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = randomized(unilora.get_model(tiny_base("int8"), unilora.AdapterConfig(
        method="unilora", target_modules=TARGETS, rank=4, theta_dim=300)), 3).eval()
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "lora")]) == 0
    theirs_model = peft.PeftModel.from_pretrained(tiny_base("int8"), tmp_path / "lora").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=IDS).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_the_command_line_trains_on_a_quantized_base_and_says_when_it_runs_on_another(tmp_path, capsys):
    from serving import smollm2_tokenizer, write_tiny_llama

    llama = write_tiny_llama(tmp_path / "llama", smollm2_tokenizer())
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "yes"}]}
            for i in range(20)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(llama), "--data", str(data), "--method", "unilora", "--theta-dim", "300",
                 "--epochs", "1", "--no-progress", "--quantize", "int8", "--out", str(out)]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task"]["quantize"] == "int8"
    capsys.readouterr()
    assert main(["evaluate", str(out / "adapter")]) == 0  # on int8 again, as recorded: no note
    assert "note:" not in capsys.readouterr().err
    assert main(["evaluate", str(out / "adapter"), "--quantize", "none"]) == 0
    assert capsys.readouterr().err.strip() == (
        "note: the adapter was trained on a base quantized as int8; it runs here on one not quantized (the same "
        "adapter numbers, other base weights: expect slightly different outputs)")
    assert main(["finetune", "--data", str(tmp_path / "x.csv"), "--task", "seq-cls", "--quantize", "int8",
                 "--out", str(tmp_path / "cls")]) == 2


def test_the_command_line_merges_on_a_quantized_base_and_writes_a_full_precision_merged_model(tmp_path, capsys):
    from serving import smollm2_tokenizer, write_tiny_llama
    from unilora.models.quantization import quantize_model as quantized

    llama = write_tiny_llama(tmp_path / "llama", smollm2_tokenizer())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n" for i in range(16)))
    adapter = tmp_path / "run" / "adapter"
    assert main(["finetune", "--model", str(llama), "--data", str(data), "--method", "unilora", "--theta-dim", "300",
                 "--epochs", "1", "--no-progress", "--quantize", "int8", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()

    assert main(["generate", str(adapter), "--prompt", "3 + 1 =", "--max-new-tokens", "2", "--merge"]) == 0
    said = capsys.readouterr().err.splitlines()[0]
    assert said.startswith("note: merging changed the adapted layers' outputs by at most")
    assert said.endswith("on the first prompts; --merge-to float32 merges without quantizing again")

    assert main(["generate", str(adapter), "--prompt", "3 + 1 =", "--max-new-tokens", "2", "--merge-to", "bfloat16"]) == 0
    bf16_answer = capsys.readouterr()
    assert "merging changed" not in bf16_answer.err  # nothing quantized again: nothing to report

    out = tmp_path / "merged"
    assert main(["export", str(adapter), str(out), "--to", "merged"]) == 0
    assert "wrote merged model" in capsys.readouterr().out
    marker = json.loads((out / "unilora_merged.json").read_text())
    assert marker["quantize"] == "int8" and marker["method"] == "unilora" and "model.safetensors" in marker["files"]
    written = LlamaForCausalLM.from_pretrained(out).eval()  # plain transformers: no adapter, no quantization
    assert written.dtype == torch.float32
    assert not any(is_quantized(m.weight) for m in written.modules() if isinstance(m, torch.nn.Linear))
    # the same numbers as the adapter merged in full precision into the int8 base it was trained on
    reference = unilora.from_pretrained(quantized(LlamaForCausalLM.from_pretrained(llama), "int8"), adapter).eval()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
        reference.merge(to="float32")
        assert (written(input_ids=IDS).logits - reference(input_ids=IDS).logits).abs().max() < 1e-5
        assert (written(input_ids=IDS).logits - expected).abs().max() < 1e-4

    (out / "notes.txt").write_text("mine")
    assert main(["export", str(adapter), str(out), "--to", "merged"]) == 2  # not without --overwrite
    assert main(["export", str(adapter), str(out), "--to", "merged", "--merge-to", "bfloat16", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only what we wrote is replaced
    assert LlamaForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # generate --merge-to answers as the written model does
    tokenizer = smollm2_tokenizer()
    ids = torch.tensor([tokenizer("3 + 1 =").input_ids])
    answer = LlamaForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=2, do_sample=False,
                                                            pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True).strip() == bf16_answer.out.strip()
    capsys.readouterr()
    assert main(["export", str(adapter), str(tmp_path / "x"), "--to", "merged", "--rank", "8"]) == 2
    assert main(["export", str(adapter), str(tmp_path / "x"), "--merge-to", "float32"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --rank goes with --to peft-lora; --to merged writes the whole model with the adapter merged in",
        "error: --merge-to goes with --to merged; a PEFT LoRA export holds the adapter alone"]


@pytest.mark.parametrize("method", ["unilora", "lora_xs"])
def test_gradient_checkpointing_both_modes_on_an_int8_base_equals_none(method):
    def grads(reentrant):
        model = randomized(unilora.get_model(tiny_base("int8"), unilora.AdapterConfig(
            method=method, target_modules=TARGETS, rank=4, **OPTIONS)), 5)
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = grads(None)
    for reentrant in (True, False):
        found = grads(reentrant)
        assert found.keys() == reference.keys()
        for name in reference:
            assert torch.allclose(found[name], reference[name], rtol=1e-5, atol=1e-6), (reentrant, name)


def test_trainer_with_default_arguments_on_an_int8_base(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    model = unilora.get_model(tiny_base("int8"), unilora.AdapterConfig(method="unilora", target_modules=TARGETS,
                                                                       rank=4, theta_dim=300))
    start = model.projection.theta_d.detach().clone()
    rows = [{"input_ids": IDS[i % 2].tolist(), "labels": IDS[i % 2].tolist()} for i in range(8)]
    trainer = unilora.Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2,
                                                                  per_device_train_batch_size=4, report_to=[]),
                              train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    assert not torch.equal(model.projection.theta_d, start)
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    loaded = unilora.from_pretrained(tiny_base("int8"), tmp_path / "final")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_serve_on_an_int8_base_answers_as_the_adapter_alone_on_it(tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from serving import smollm2_tokenizer, write_adapter, write_tiny_llama
    from unilora.serve.app import create_app
    from unilora.serve.settings import ServeSettings

    tokenizer = smollm2_tokenizer()
    llama = write_tiny_llama(tmp_path / "llama", tokenizer)
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(llama, store / "a", "unilora", seed=1)
    with TestClient(create_app(ServeSettings(adapters=str(store), model=str(llama), quantize="int8"))) as client:
        for _ in range(600):  # up to a minute for the model to load
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        text = client.post("/v1/completions", json={"model": "a", "prompt": "Tell me about rain", "max_tokens": 6,
                                                    "temperature": 0}).json()["choices"][0]["text"]
    base = quantize_model(LlamaForCausalLM.from_pretrained(llama).eval(), "int8")
    model = unilora.from_pretrained(base, store / "a").eval()
    ids = tokenizer("Tell me about rain")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=0)
    assert text == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_fsdp2_refuses_a_quantized_base_in_one_line():
    from unilora.engine.distributed import fully_shard_adapted

    model = unilora.get_model(tiny_base("int8"), unilora.AdapterConfig(method="unilora", target_modules=TARGETS,
                                                                       rank=4, theta_dim=300))
    with pytest.raises(unilora.UniLoraError) as refused:
        fully_shard_adapted(model)
    assert str(refused.value) == ("FSDP2 cannot shard a quantized base ('model.layers.0.self_attn.q_proj.base_layer"
                                  ".weight' is Int8Tensor); train on a quantized base in one process, or shard the "
                                  "unquantized model")
