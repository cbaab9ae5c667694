"""Tiny random-init models of the four layouts the library must handle, the helpers tests in several
folders share, and the rule of the two test tiers."""

import multiprocessing.process
import shutil
import subprocess
from pathlib import Path

import peft
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from unilora.cli import main
from unilora.models.backbones import resolve_model

VOCAB = 96
TESTS = Path(__file__).resolve().parent  # this folder: the shared helpers (serving.py, fuzz_adapters.py, ...)
ROOT = TESTS.parent  # the checkout: README.md, scripts/, benchmarks/


def pytest_configure(config):
    """Libraries that build a cache on first use do it here, once, before any test runs: matplotlib
    lists the system's fonts with a subprocess on its first import in a new HOME, which is not a
    process of ours and must not trip the slow-tier rule below (a test's verdict must not depend on
    which caches the machine happens to hold)."""
    try:
        import matplotlib
    except ImportError:  # the `plots` extra is optional; the tests that plot say so themselves
        return
    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (builds the font list, in memory and in its cache)


@pytest.fixture(autouse=True)
def slow_tier_rule(request, monkeypatch):
    """A test that loads real pretrained weights or starts another process carries @pytest.mark.slow,
    so that `pytest -m "not slow"` stays the fast tier: an unmarked test that does either fails."""
    if request.node.get_closest_marker("slow"):
        return
    import unilora.models.backbones as backbones

    def refused(what):
        def refuse(*args, **kwargs):
            pytest.fail(f"this test {what}: mark it @pytest.mark.slow (see pyproject's markers)", pytrace=False)
        return refuse

    load_pretrained = backbones.load_pretrained

    def load(name, model_class):
        if backbones.is_embedded(name) or backbones.is_embedded_llm(name):
            backbones.resolve_model(name)  # where the model cannot be found, that error is the test's
            refused(f"loads the real weights of {name}")()
        return load_pretrained(name, model_class)

    monkeypatch.setattr(backbones, "load_pretrained", load)
    monkeypatch.setattr(subprocess.Popen, "__init__", refused("starts a process"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refused("starts a process"))


def tiny_bert():
    return BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=3, max_position_embeddings=64)
    )


def tiny_roberta():
    return RobertaForSequenceClassification(
        RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=2, max_position_embeddings=64)
    )


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))


def tiny_llama():
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    )


ARCHS = {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "gpt2": [], "llama": []}


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def method_options(method: str) -> dict:
    """Small settings under which every method runs on the tiny models (hidden 32, FFN 64)."""
    return dict(method=method, rank=4, theta_dim=300, num_vectors=12, vector_length=16, topk=2, seed=3)


def logits_of(model, ids):
    out = model(input_ids=ids)
    return out.logits


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def edit_adapter_config(directory, change):
    """Apply change(meta) to a saved adapter_config.json and re-sign it, as a deliberate edit
    would: the checks behind the checksum must still catch what the edit broke."""
    import json
    from pathlib import Path

    from unilora.store.io import config_sha256

    path = Path(directory) / "adapter_config.json"
    meta = json.loads(path.read_text())
    change(meta)
    meta["config_sha256"] = config_sha256(meta)
    path.write_text(json.dumps(meta))


def edit_adapter_weights(directory, change):
    """Apply change(tensors) to a saved adapter_model.safetensors and re-sign the config with the
    new checksum: what is left to catch is what the values themselves break."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from unilora.store.io import file_sha256

    path = Path(directory) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    edit_adapter_config(directory, lambda meta: meta.update(weights_sha256=file_sha256(path)))


def one_line_error(argv, capsys, *fragments):
    """The command fails with exit code 2 and one line on stderr holding every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def small_bert(folder):
    """A local model folder: a small random BERT (hidden 32, FFN 48) with MiniLM's tokenizer."""
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48)).save_pretrained(folder)
    minilm = resolve_model("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", folder / name)
    return folder


def peft_lora_dir(tmp_path, r=4, targets=("q_proj", "v_proj")):
    """A PEFT LoRA on the tiny Llama, its B factors nonzero, saved by PEFT."""
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(str(tmp_path / "peft"))
    return model.eval(), tmp_path / "peft"
