"""transformers.Trainer and TRL's SFTTrainer with default arguments, on tiny models."""

import json

import datasets
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainingArguments

import unilora
from unilora import AdapterConfig, get_model

from conftest import ROOT, build, logits_of, method_options


def classifier(method="unilora"):
    model = get_model(build("bert"), AdapterConfig(**{**method_options(method), "target_modules": "all-linear",
                                                      "modules_to_save": ["classifier"]}))
    for module in model.modules():  # deterministic, so a resumed run can equal a straight one
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def classification_data(rows=24):
    g = torch.Generator().manual_seed(0)
    # "text" is not a forward argument: Trainer must drop it by the model's signature
    return datasets.Dataset.from_list([{"input_ids": torch.randint(0, 96, (8,), generator=g).tolist(),
                                        "label": i % 3, "text": f"row {i}"} for i in range(rows)])


def tiny_tokenizer():
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(93)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_trainer_with_default_arguments_trains_evaluates_and_saves_adapters(tmp_path):
    model = classifier()
    start = model.projection.theta_d.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4)
    trainer = unilora.Trainer(model=model, args=args, train_dataset=classification_data(),
                              eval_dataset=classification_data(9))
    trainer.train()
    assert not torch.equal(model.projection.theta_d, start)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    model.eval()
    expected = logits_of(model, ids)
    for folder in (tmp_path / "out" / "checkpoint-4", tmp_path / "final"):
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        loaded = unilora.from_pretrained(build("bert"), folder)
        assert torch.allclose(logits_of(loaded, ids), expected, atol=1e-6), folder
    with open(tmp_path / "final" / "adapter_config.json") as handle:
        assert json.load(handle)["head_modules"] == ["classifier"]


def test_plain_transformers_trainer_sees_the_signature_and_labels(tmp_path):
    model = classifier()
    trainer = transformers.Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_steps=2),
                                   train_dataset=classification_data(), eval_dataset=classification_data(9))
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert "eval_loss" in trainer.evaluate()


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    def run(output_dir, max_steps, resume=None):
        torch.manual_seed(0)
        model = classifier("vblora")  # checkpoints keep the logits: exact resumption
        args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=2,
                                 per_device_train_batch_size=4, seed=0)
        trainer = unilora.Trainer(model=model, args=args, train_dataset=classification_data())
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "a", 4)  # writes checkpoint-2 on the way, as an interrupted run would have
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    for name in straight:
        assert torch.allclose(resumed[name], straight[name], atol=1e-6), name


def test_gpt2_with_tied_embeddings_saves_through_trainer(tmp_path):
    model = get_model(build("gpt2"), AdapterConfig(**{**method_options("unilora"), "target_modules": "all-linear"}))
    assert model.get_base_model().lm_head.weight is model.get_base_model().transformer.wte.weight
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_list([{"input_ids": (ids := torch.randint(0, 96, (8,), generator=g).tolist()),
                                        "labels": ids} for _ in range(8)])
    trainer = unilora.Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_steps=2),
                              train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = unilora.from_pretrained(build("gpt2"), tmp_path / "final")
    assert torch.equal(loaded.projection.theta_d, model.projection.theta_d)


def test_save_pretrained_accepts_the_keywords_trainer_passes(tmp_path):
    model = classifier()
    model.save_pretrained(tmp_path / "a", state_dict=model.state_dict(), safe_serialization=True, is_main_process=True)
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method", ["unilora", "vblora"])
def test_trl_sft_trainer_trains_and_saves_our_adapter(method, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = get_model(build("llama"), AdapterConfig(**{**method_options(method), "target_modules": "all-linear"}))
    start = {n: p.detach().clone() for n, p in model.projection.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_list(
        [{"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 93, (12,), generator=g))} for _ in range(16)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, max_length=32, bf16=False)
    trainer = unilora.adapter_trainer(SFTTrainer)(model=model, args=args, train_dataset=data,
                                                  processing_class=tiny_tokenizer())
    trainer.train()
    assert any(not torch.equal(p, start[n]) for n, p in model.projection.named_parameters())
    trainer.save_model(str(tmp_path / "final"))
    loaded = unilora.from_pretrained(build("llama"), tmp_path / "final")
    ids = torch.randint(0, 93, (1, 6), generator=g)
    with torch.no_grad():
        assert torch.allclose(logits_of(loaded, ids), logits_of(model.eval(), ids), atol=1e-6)


def test_readme_trainer_snippet_runs(tmp_path, monkeypatch):
    """The README's "With Hugging Face Trainer and TRL" snippet, run as written."""

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### With Hugging Face Trainer and TRL", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "trainer-out" / "final" / "adapter_config.json").is_file()
    assert isinstance(namespace["reloaded"], unilora.AdaptedModel)
