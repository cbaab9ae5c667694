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
    assert main(["export", str(tmp_path / "ours"), "--to", "peft-lora", str(tmp_path / "peft")]) == 0
    assert "r=8 (trained rank 4, zero rows/columns added for vLLM)" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"] is None
    peft_model = PeftModel.from_pretrained(build(arch), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = logits_of(peft_model, ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        base = logits_of(build(arch), ids)
    assert not torch.allclose(base, expected, atol=1e-4), "the adapter must matter for this check to mean anything"


def test_export_pads_to_vllm_ranks_and_keeps_the_head_apart(tmp_path, capsys):
    config = AdapterConfig(method="unilora", rank=4, theta_dim=300, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
    get_model(build("bert"), config).save_pretrained(tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "peft"), "--rank", "16"]) == 0
    assert "head.safetensors" in capsys.readouterr().out
    lora = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = lora["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    b = lora["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert a.shape == (16, 32) and b.shape == (32, 16)
    assert a[4:].abs().max() == 0 and b[:, 4:].abs().max() == 0
    assert not any("classifier" in k for k in lora)
    assert set(load_file(str(tmp_path / "peft" / "head.safetensors"))) == {"classifier.weight", "classifier.bias"}
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "bad"), "--rank", "2"]) == 2
    assert "below the adapter's rank 4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
