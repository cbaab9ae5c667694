"""Export to a standard PEFT LoRA directory: PEFT itself must give the same outputs as ours."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import unilora
from unilora import AdapterConfig, get_model
from unilora.cli import main

from conftest import build, logits_of, method_options


def trained_like(arch, method, targets):
    model = get_model(build(arch), AdapterConfig(**{**method_options(method), "target_modules": targets}))
    with torch.no_grad():  # non-trivial A and B (several methods start with ΔW = 0)
        for p in model.projection.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model.eval()


@pytest.mark.parametrize("method", list(unilora.METHODS))
@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"]),
                                          ("roberta", ["query", "value"])])
def test_peft_loads_the_export_with_identical_outputs(method, arch, targets, ids, tmp_path, capsys):
    model = trained_like(arch, method, targets)
    model.save_pretrained(tmp_path / "ours")
    expected = logits_of(model, ids)
    base = []
    if model.projection.needs_base_weights:  # LoRA-XS, TinyLoRA: B = U_r Σ_r R from the base weights' SVD
        build(arch).save_pretrained(tmp_path / "base")
        base = ["--model", str(tmp_path / "base")]
    assert main(["export", str(tmp_path / "ours"), "--to", "peft-lora", str(tmp_path / "peft"), *base]) == 0
    assert "r=4 (trained rank 4)" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"] is None
    # PEFT's classification class needs a trained head in the file: none here, so no task type
    assert config["task_type"] == {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "roberta": None}[arch]
    peft_model = PeftModel.from_pretrained(build(arch), str(tmp_path / "peft")).eval()
    peft_class = {"CAUSAL_LM": "PeftModelForCausalLM", None: "PeftModel"}
    assert type(peft_model).__name__ == peft_class[config["task_type"]]
    with torch.no_grad():
        got = logits_of(peft_model, ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        base = logits_of(build(arch), ids)
    assert not torch.allclose(base, expected, atol=1e-4), "the adapter must matter for this check to mean anything"


def test_classifier_export_carries_its_head_for_peft(ids, tmp_path, capsys):
    model = get_model(build("roberta"), AdapterConfig(**{**method_options("unilora"), "target_modules": ["query", "value"],
                                                         "modules_to_save": ["classifier"]}))
    with torch.no_grad():
        model.projection.theta_d.add_(0.3)
        for p in model.head_parameters().values():
            p.add_(0.2)
    model.eval().save_pretrained(tmp_path / "ours")
    expected = logits_of(model, ids)
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert not (tmp_path / "peft" / "head.safetensors").exists()
    peft_model = PeftModel.from_pretrained(build("roberta"), str(tmp_path / "peft")).eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        assert torch.allclose(logits_of(peft_model, ids), expected, atol=1e-5)


def test_export_pads_on_request_and_keeps_the_head_apart(tmp_path, capsys):
    config = AdapterConfig(method="unilora", rank=4, theta_dim=300, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["lm_head"])
    get_model(build("llama"), config).save_pretrained(tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "peft"), "--rank", "16"]) == 0
    assert "head.safetensors" in capsys.readouterr().out
    lora = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (16, 32) and b.shape == (32, 16)
    assert a[4:].abs().max() == 0 and b[:, 4:].abs().max() == 0
    assert not any("lm_head" in k for k in lora), "vLLM rejects modules_to_save in a causal-LM LoRA file"
    assert set(load_file(str(tmp_path / "peft" / "head.safetensors"))) == {"lm_head.weight"}
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "bad"), "--rank", "2"]) == 2
    assert "below the adapter's rank 4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_names_the_real_base_model(tmp_path):
    base = build("llama")
    base.config._name_or_path = "my-org/my-llama"  # what from_pretrained records
    get_model(base, AdapterConfig(**method_options("unilora"), target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/my-llama"
