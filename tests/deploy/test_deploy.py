"""Beyond one process: adapter stores behind fsspec URLs (a verified local cache), and the vLLM
resolver plugin (expansion into exact PEFT LoRA, refusals, the bounded cache), then vLLM's own
plugin loader, PEFTHelper and validate_legal in a separate environment."""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import ROOT, tiny_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

import unilora
from unilora.core.errors import UniLoraError
from unilora.deploy.vllm_resolver import UniloraResolution, other_weights_warning, same_base
from unilora.store.source import AdapterStore
from unilora.store.remote import local_copy



def save_model(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tiny_llama().save_pretrained(folder)
    return folder


def save_adapter(model_dir: Path, out: Path, method: str = "unilora", seed: int = 1) -> Path:
    model = unilora.get_model(LlamaForCausalLM.from_pretrained(model_dir),
                              unilora.AdapterConfig(method=method, target_modules=["q_proj", "v_proj"], rank=4,
                                                    theta_dim=200, num_vectors=12, vector_length=16, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_model(root / "tiny-base", 0), save_model(root / "other-base", 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, models):
    base, other = models
    root = tmp_path_factory.mktemp("store")
    save_adapter(base, root / "good")
    save_adapter(base, root / "also-good", method="vblora", seed=2)
    save_adapter(base, root / "svd-good", method="lora_xs", seed=3)  # its factors come from the base weights
    save_adapter(base, root / "svd-also", method="tinylora", seed=4)
    save_adapter(other, root / "foreign")
    shutil.copytree(root / "good", root / "damaged")
    weights = root / "damaged" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    return root


def logits(model, ids=torch.tensor([[3, 14, 15, 92, 65]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_resolver_expands_an_adapter_into_the_same_peft_lora(models, store, tmp_path):
    base, _ = models
    resolution = UniloraResolution(str(store), tmp_path / "cache")
    for name in ("good", "also-good", "svd-good"):
        path, lora_id = resolution.resolve("org/tiny-base", name)
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "org/tiny-base"
        assert config["r"] == 4  # no rank padding
        ours = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(base), store / name).eval()
        theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), path).eval()
        assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
        assert resolution.resolve("org/tiny-base", name) == (path, lora_id) and lora_id > 0


def test_svd_adapters_share_one_load_of_the_base_model(models, store, tmp_path, monkeypatch):
    """LoRA-XS and TinyLoRA are rebuilt from the base weights: the resolver loads them once, from the
    name found on this machine (the recorded folder; "org/tiny-base" would be a hub download)."""
    import unilora.models.adapter_base as export

    loaded = []

    def counting(name, model_class):
        model = real(name, model_class)
        loaded.append(name)
        return model

    real = export.load_weights
    monkeypatch.setattr(export, "load_weights", counting)
    resolution = UniloraResolution(str(store), tmp_path / "cache")
    for name in ("svd-good", "svd-also", "good"):
        path, _ = resolution.resolve("org/tiny-base", name)
        ours = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(models[0]), store / name).eval()
        theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(models[0]), path).eval()
        assert torch.allclose(logits(ours), logits(theirs), atol=1e-5), name
    assert loaded == [str(models[0])]


def test_the_resolver_refuses_what_it_must_and_keeps_its_cache_bounded(store, tmp_path):
    resolution = UniloraResolution(str(store), tmp_path / "cache", max_cached=1)
    for name in ("../good", "good/../foreign", "nobody", "damaged"):
        assert resolution.resolve("tiny-base", name) is None, name
    assert resolution.resolve("tiny-base", "foreign") is None  # trained on other-base
    assert resolution.resolve("tiny-base", "good") is not None
    assert resolution.resolve("tiny-base", "also-good") is not None
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_which_base_names_are_the_same_model():
    assert same_base("/models/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert same_base("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")  # the embedded model
    assert same_base(None, "anything")
    assert not same_base("/models/tiny-base", "org/other-base")
    # vLLM serving the dequantized copy an embedded-SmolLM2 adapter was trained on (what `export` names)
    copy = "/root/.cache/unilora/SmolLM2-135M-Instruct-dequantized"
    assert same_base("SmolLM2-135M-Instruct", copy)
    assert other_weights_warning("a", "SmolLM2-135M-Instruct", copy) is None
    said = other_weights_warning("a", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert said.startswith("unilora adapter 'a' was trained on the embedded SmolLM2-135M-Instruct dequantized")
    assert other_weights_warning("a", "/models/tiny-base", "/models/tiny-base") is None


def memory_store(store: Path, names) -> str:
    root = f"memory://stores-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in names:
        for file in (store / name).iterdir():
            fs.pipe(f"{root[len('memory://'):]}/{name}/{file.name}", file.read_bytes())
    return root


def test_an_fsspec_store_is_read_through_a_verified_cache(models, store, tmp_path, monkeypatch):
    monkeypatch.setenv("UNILORA_CACHE", str(tmp_path / "cache"))
    base, _ = models
    url = memory_store(store, ["good", "also-good", "damaged"])
    remote = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(base), f"{url}/good").eval()
    local = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(base), store / "good").eval()
    assert torch.equal(logits(remote), logits(local))
    with pytest.raises(UniLoraError, match="checksum"):
        local_copy(f"{url}/damaged")
    first = local_copy(f"{url}/good")
    # the remote folder is replaced by another adapter: the next read fetches it, the old copy goes
    fs = fsspec.filesystem("memory")
    for file in (store / "also-good").iterdir():
        fs.pipe(f"{url[len('memory://'):]}/good/{file.name}", file.read_bytes())
    second = local_copy(f"{url}/good")
    assert second != first and not first.exists()
    assert json.loads((second / "adapter_config.json").read_text())["adapter"]["method"] == "vblora"
    served = AdapterStore(url)
    assert served.names() == ["also-good", "damaged", "good"]
    adapter, _ = served.read("also-good")
    assert adapter.config.method == "vblora"


@pytest.mark.slow
def test_vllm_loads_the_resolver_through_its_entry_point(models, store, tmp_path):
    """In a separate environment with vLLM's wheel (scripts/vllm_venv.sh): vLLM's own plugin loader,
    resolver registry, PEFTHelper.from_local_dir and validate_legal."""
    made = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_venv.sh")], capture_output=True, text=True,
                          timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    python = made.stdout.strip().splitlines()[-1]
    env = {**os.environ, "UNILORA_VLLM_STORE": str(store), "UNILORA_VLLM_CACHE": str(tmp_path / "cache"),
           "VLLM_PLUGINS": "unilora_resolver", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    run = subprocess.run([python, str(ROOT / "tests" / "vllm_check.py"), str(store), "org/tiny-base", "64", "good",
                          "../good", "nobody", "damaged", "foreign"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["registered"] == ["unilora"] and result["name"] == "good" and result["id"] > 0
    assert result["r"] == 4 and result["target_modules"] == ["q_proj", "v_proj"]
    assert "greater than max_lora_rank" in result["rank_1_refused"]
    assert result["refused"] == {"../good": True, "nobody": True, "damaged": True, "foreign": True}
    assert Path(result["path"]).parent == tmp_path / "cache"
