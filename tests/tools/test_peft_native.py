"""`unilora convert`: our Uni-LoRA / VeRA / VB-LoRA / TinyLoRA adapters as PEFT 0.21.2's own directories,
and PEFT's as ours; PeftModel and our model give the same logits."""

import json

import pytest
import torch
from peft import PeftModel, TinyLoraConfig, UniLoraConfig, VBLoRAConfig, VeraConfig, get_peft_model
from safetensors.torch import load_file

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main as cli_main

from conftest import HEADS, VOCAB, build, method_options


@pytest.fixture
def rows():
    return torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(7))


def trained_adapter(arch, method, folder, **overrides):
    options = {**method_options(method), "target_modules": "all-linear", "modules_to_save": HEADS[arch], **overrides}
    model = get_model(build(arch), AdapterConfig(**options))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    model.eval().save_pretrained(folder)
    return model


PEFT_NAMES = {"unilora": "UNILORA", "vera": "VERA", "vblora": "VBLORA", "tinylora": "TINYLORA"}


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method,options", [("unilora", []), ("vera", []), ("vblora", []), ("tinylora", []),
                                            ("tinylora", ["--no-save-projection"])])
def test_ours_to_peft_gives_our_logits(arch, method, options, rows, tmp_path, capsys):
    ours = trained_adapter(arch, method, tmp_path / "ours", u=5, weight_tying=0.5)
    if method == "tinylora":  # its SVD factors come from the base model's weights
        build(arch).save_pretrained(tmp_path / "base")
        options = [*options, "--model", str(tmp_path / "base")]
    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "peft"), *options]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_NAMES[method]
    if method == "tinylora":  # without P in the file PEFT redraws it from projection_seed, as ours does
        saved = any(".tinylora_P" in key for key in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        assert config["save_projection"] == saved == ("--no-save-projection" not in options)
    peft_model = PeftModel.from_pretrained(build(arch), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = ours(input_ids=rows).logits
        torch.testing.assert_close(peft_model(input_ids=rows).logits, expected, atol=1e-5, rtol=0)
        with ours.disable_adapter():  # the adapter changes the output, so the comparison means something
            assert not torch.allclose(ours(input_ids=rows).logits, expected, atol=1e-3)


def test_ours_to_peft_keeps_a_scaling_where_peft_can(rows, tmp_path):
    ours = trained_adapter("llama", "unilora", tmp_path / "ours", alpha=8.0)  # scaling 2 at rank 4
    cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "peft")])
    peft_model = PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=rows).logits, ours(input_ids=rows).logits, atol=1e-5, rtol=0)
    trained_adapter("llama", "vblora", tmp_path / "scaled-vblora", alpha=8.0)
    with pytest.raises(UniLoraError, match="no scaling"):
        unilora.tools.peft_native.to_peft(tmp_path / "scaled-vblora", tmp_path / "out")


def peft_config(kind, arch, **options):
    targets = ["q_proj", "v_proj", "up_proj"] if arch == "llama" else ["query", "value", "dense"]
    common = dict(r=4, target_modules=targets, modules_to_save=HEADS[arch] or None,
                  task_type="CAUSAL_LM" if arch == "llama" else "SEQ_CLS", **options)
    if kind == "vblora":
        return VBLoRAConfig(num_vectors=12, vector_length=16, topk=2, **common)
    if kind == "vera":
        return VeraConfig(**{"save_projection": True, "projection_prng_key": 3, **common})
    if kind.startswith("tinylora"):  # "tinylora-noP": saved without its P tensors
        return TinyLoraConfig(**{**common, "r": 2, "u": 5, "weight_tying": 0.5, "projection_seed": 11,
                                 "save_projection": kind == "tinylora", **options})
    return UniLoraConfig(**{"theta_d_length": 300, "save_indices": True, **common})


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("kind", ["vblora", "unilora", "vera", "tinylora", "tinylora-noP"])
def test_peft_to_ours_gives_peft_logits(kind, arch, rows, tmp_path, capsys):
    torch.manual_seed(0)
    config = peft_config(kind, arch)
    peft_model = get_peft_model(build(arch), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    build(arch).save_pretrained(tmp_path / "base")  # VeRA: the layers' input sizes come from the model's config
    model = ["--model", str(tmp_path / "base")] if kind in ("vera", "tinylora", "tinylora-noP") else []
    assert cli_main(["convert", str(tmp_path / "peft"), str(tmp_path / "ours"), *model]) == 0
    ours = unilora.from_pretrained(build(arch), tmp_path / "ours")
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=rows).logits
        torch.testing.assert_close(ours(input_ids=rows).logits, expected, atol=1e-5, rtol=0)
    # and back again: PEFT reads our conversion of its own adapter
    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "peft-again"), *model[:0 if kind == "vera" else 2]]) == 0
    again = PeftModel.from_pretrained(build(arch), tmp_path / "peft-again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=rows).logits, expected, atol=1e-5, rtol=0)


def test_peft_tinylora_of_a_bfloat16_model_converts_and_loads(rows, tmp_path, capsys):
    """PEFT rounds TinyLoRA's SVD factors to the model's dtype; the conversion checks them against the
    given model's own SVD at that precision and records that SVD's fingerprint, so the adapter loads onto
    the model (in bfloat16 or float32) and gives PEFT's logits; another model is refused at conversion."""
    torch.manual_seed(0)
    peft_model = get_peft_model(build("llama").to(torch.bfloat16), peft_config("tinylora", "llama"))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    build("llama").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    assert cli_main(["convert", str(tmp_path / "peft"), str(tmp_path / "ours"), "--model", str(tmp_path / "base")]) == 0
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=rows).logits.float()
        for dtype in (torch.bfloat16, torch.float32):
            ours = unilora.from_pretrained(build("llama").to(torch.bfloat16).to(dtype), tmp_path / "ours")
            torch.testing.assert_close(ours(input_ids=rows).logits.float(), expected, atol=0.05, rtol=0.02)
    build("llama", seed=1).save_pretrained(tmp_path / "other")
    assert cli_main(["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--model", str(tmp_path / "other")]) == 2
    assert "give the base model it was trained on" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_what_it_cannot_do_exactly(tmp_path, capsys):
    trained_adapter("llama", "lora", tmp_path / "lora")
    assert cli_main(["convert", str(tmp_path / "lora"), str(tmp_path / "out")]) == 2
    assert "no lora adapter type" in capsys.readouterr().err
    # a damaged PEFT file: an index beyond θ_d
    from safetensors.torch import load_file, save_file

    get_peft_model(build("llama"), peft_config("unilora", "llama")).save_pretrained(tmp_path / "damaged")
    state = load_file(tmp_path / "damaged" / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("unilora_indices_A"))
    state[key][0, 0] = 300
    save_file(state, tmp_path / "damaged" / "adapter_model.safetensors")
    assert cli_main(["convert", str(tmp_path / "damaged"), str(tmp_path / "out")]) == 2
    assert "must lie in [0, 300)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    get_peft_model(build("llama"), peft_config("vera", "llama")).save_pretrained(tmp_path / "peft-vera")
    assert cli_main(["convert", str(tmp_path / "peft-vera"), str(tmp_path / "out")]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "peft-vera"), str(tmp_path / "out"), "--model", str(tmp_path / "nothing")]) == 2
    assert "no model config" in capsys.readouterr().err
    tiny_bert = tmp_path / "bert"
    build("bert").save_pretrained(tiny_bert)
    assert cli_main(["convert", str(tmp_path / "peft-vera"), str(tmp_path / "out"), "--model", str(tiny_bert)]) == 2
    assert "lacks" in capsys.readouterr().err  # the wrong model: its layers have other names
    assert not (tmp_path / "out").exists()
    get_peft_model(build("llama"), peft_config("unilora", "llama", save_indices=False)).save_pretrained(tmp_path / "redraw")
    assert cli_main(["convert", str(tmp_path / "redraw"), str(tmp_path / "out")]) == 2
    assert "save_indices=True" in capsys.readouterr().err
    trained_adapter("llama", "vera", tmp_path / "vera")
    assert cli_main(["convert", str(tmp_path / "vera"), str(tmp_path / "vera" / "inside")]) == 2
    assert "overwrite or nest" in capsys.readouterr().err
