"""Causal-LM fine-tuning from the CLI on a tiny random Llama with SmolLM2's real tokenizer (its chat
template included): loss masks, the loss restricted to target positions, task choice, finetune ->
generate -> evaluate -> export, and the metrics."""

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_gpt2, tiny_llama
from serving import smollm2_tokenizer, write_tiny_llama
from unilora.data.lm_tokens import IGNORE, collate, encode_chat, encode_prompt_completion, encode_texts
from unilora.training.causal_lm import score, token_loss
from unilora.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A local model folder: a tiny random Llama (hidden 32) with SmolLM2's tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=512)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """A learnable instruction task: say whether a number is even or odd."""
    return [{"messages": [{"role": "user", "content": f"Is {i} even or odd?"},
                          {"role": "assistant", "content": "even" if i % 2 == 0 else "odd"}]} for i in range(n)]


def one_line_error(argv, capsys, fragment):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err


# --- what the loss sees ---------------------------------------------------------------------

def test_chat_loss_covers_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "Is 3 even?"}, {"role": "assistant", "content": "No, odd."},
                {"role": "user", "content": "And 4?"}, {"role": "assistant", "content": "Even."}]
    encoded = encode_chat(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == rendered
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    assert spans == ["No, odd.<|im_end|>\n", "Even.<|im_end|>\n"]  # the user turns and system prompt carry no loss


def test_prompt_completion_and_packed_text(tokenizer):
    encoded = encode_prompt_completion(tokenizer, "Question: 2 + 2 =", " 4")
    learned = [t for t in encoded.labels if t != IGNORE]
    assert tokenizer.decode(learned) == " 4<|im_end|>" and learned[-1] == tokenizer.eos_token_id
    texts = ["one two three four five", "six seven", "eight nine ten eleven twelve thirteen"]
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    packed = encode_texts(tokenizer, texts, max_length=4, packing=True)
    assert [t for block in packed for t in block.input_ids] == stream  # nothing lost, nothing repeated
    assert all(len(b.input_ids) == 4 for b in packed[:-1]) and all(b.labels == b.input_ids for b in packed)
    unpacked = encode_texts(tokenizer, texts, max_length=4, packing=False)
    assert len(unpacked) > len(packed)  # each document starts a block of its own


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_loss_on_target_positions_equals_the_full_loss(build):
    """`logits_to_keep` computes logits only where a target is predicted; the loss must not change.
    """
    torch.manual_seed(0)
    model = build().eval()  # no dropout: the two passes must see the same network
    ids = torch.randint(0, 96, (3, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 7:] = ids[0, 7:]
    labels[1, 10:] = ids[1, 10:]
    labels[2, 3:5] = ids[2, 3:5]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kept = token_loss(model, batch, keep_logits=True)
    full = token_loss(model, batch, keep_logits=False)
    assert torch.allclose(kept, full, atol=1e-6)
    assert torch.allclose(full, model(input_ids=ids, labels=labels).loss, atol=1e-6)
    kept.backward()  # and it trains: gradients reach the embeddings through the kept positions
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_right_padded_batches_do_not_change_a_row(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    short = encode_prompt_completion(tokenizer, "ab", "c")
    short.input_ids = [t % 96 for t in short.input_ids]
    short.labels = [t % 96 if t != IGNORE else t for t in short.labels]
    long = type(short)(list(range(10, 30)), list(range(10, 30)))
    alone = token_loss(model, collate([short], 0), "sum")
    together = token_loss(model, collate([short, long], 0), "sum") - token_loss(model, collate([long], 0), "sum")
    assert torch.allclose(alone, together, atol=1e-4)


def test_metrics():
    assert score("accuracy", ["Fresh.", "rotten, because", "I think fresh"], ["fresh", "rotten", "fresh"]) == 2 / 3
    assert score("exact_match", ["Odd!", "even number"], ["odd", "even"]) == 0.5
    assert score("rougeL", ["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert score("rougeL", ["dogs bark loudly"], ["the cat sat"]) == 0.0
    partial = score("rougeL", ["the cat ran"], ["the cat sat"])
    assert partial == pytest.approx(100 * 2 / 3)  # LCS 2 of 3 words both ways


# --- the CLI path ---------------------------------------------------------------------------

def test_finetune_generate_evaluate_export(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--method", "unilora", "--theta-dim",
                 "500", "--epochs", "3", "--batch-size", "8", "--lr", "5e-2", "--metric", "exact_match",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["train_examples"] == 48 and metrics["test_examples"] == 12
    losses = [h["eval_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0], losses  # it learns
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert "exact_match" in metrics and "exact_match" not in metrics["history"][0]  # generation: last epoch only

    capsys.readouterr()
    assert main(["evaluate", "--json", str(out / "adapter")]) == 0  # the recorded data, split and metric
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert evaluated["exact_match"] == metrics["exact_match"]

    assert main(["generate", str(out / "adapter"), "--prompt", "Is 7 even or odd?", "--max-new-tokens", "6"]) == 0
    unmerged = capsys.readouterr().out
    assert main(["generate", str(out / "adapter"), "--prompt", "Is 7 even or odd?", "--max-new-tokens", "6",
                 "--merge"]) == 0
    assert capsys.readouterr().out == unmerged  # greedy: merging changes nothing
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Is 7 even or odd?"},
                                                      {"messages": [{"role": "user", "content": "Is 8 even or odd?"}]}])
    assert main(["generate", str(out / "adapter"), "--prompts", str(prompts), "--max-new-tokens", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["generation"] == unmerged.rstrip("\n")  # a text prompt is a user turn

    export = tmp_path / "peft"
    assert main(["export", str(out / "adapter"), str(export)]) == 0
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(llama_dir)
    from peft import PeftModel

    from unilora import AdaptedModel

    ids = torch.tensor([[1, 2, 3, 400, 5000, 60]])
    ours = AdaptedModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), out / "adapter").eval()
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), export).eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() < 1e-5


def test_plain_text_chooses_causal_lm_and_prompt_completion_trains(llama_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(30)))
    out = tmp_path / "text-run"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(corpus), "--method", "vblora", "--epochs", "1",
                 "--max-length", "32", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["adapter"]["vector_length"] == 16  # divides 32, 16 (k/v) and 64
    pairs = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(20)])
    assert main(["finetune", "--model", str(llama_dir), "--data", str(pairs), "--method", "lora", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "pc-run")]) == 0


def test_task_choice_and_bad_lm_data_are_one_line_errors(llama_dir, tmp_path, capsys):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    out = str(tmp_path / "o")
    one_line_error(["finetune", "--model", str(llama_dir), "--data", str(labelled), "--out", out], capsys,
                   "is a causal language model and the data has labels: pass --task seq-cls")
    one_line_error(["finetune", "--task", "causal-lm", "--model", "minilm", "--data", str(labelled), "--out", out],
                   capsys, "is not a causal language model")
    one_line_error(["finetune", "--task", "causal-lm", "--out", out], capsys, "--task causal-lm needs --data")
    misnamed = write_jsonl(tmp_path / "stars.jsonl", [{"text": "good film", "stars": 5}] * 4)  # no 'label': a typo,
    one_line_error(["finetune", "--data", str(misnamed), "--out", out], capsys, "column 'label' is not in")  # not LM data
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    one_line_error(["finetune", "--model", str(llama_dir), "--data", str(mixed), "--out", out], capsys,
                   "mixed.jsonl:2: this row is text data but the first row is prompt/completion")
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    one_line_error(["finetune", "--model", str(llama_dir), "--data", str(no_answer), "--out", out], capsys,
                   "q.jsonl:1: the conversation has no assistant message")
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}] * 3)
    one_line_error(["finetune", "--model", str(llama_dir), "--data", str(bad_role), "--out", out], capsys,
                   "r.jsonl:1: message 0 must be an object with 'role'")
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n\nmore text\n\nand more")
    one_line_error(["finetune", "--model", str(llama_dir), "--data", str(corpus), "--metric", "rougeL", "--out", out],
                   capsys, "plain-text data has no answers")
    one_line_error(["finetune", "--data", str(labelled), "--metric", "rougeL", "--out", out], capsys,
                   "--metric scores generated answers and goes with --task causal-lm")
    assert not Path(out).exists()


@pytest.mark.slow
def test_generate_refuses_a_classifier(tmp_path, capsys):
    out = tmp_path / "cls"
    assert main(["finetune", "--method", "lora", "--train-limit", "16", "--test-limit", "8", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    one_line_error(["generate", str(out / "adapter"), "--prompt", "hi"], capsys, "is a classifier")
    one_line_error(["generate", str(out / "adapter")], capsys, "give either --prompt TEXT or --prompts FILE.jsonl")


@pytest.mark.slow
def test_embedded_smollm2_is_the_gguf_model_dequantized_once(tmp_path, monkeypatch):
    """The cached fp32 model gives the logits of transformers' own GGUF load; the second load
    uses the cache (no message) and loads no GGUF."""
    from transformers import AutoModelForCausalLM

    from unilora.core.notes import Note
    from unilora.models.backbones import load_causal_lm
    from unilora.models.embedded_llm import _GGUF_FILE, _source

    monkeypatch.setenv("UNILORA_CACHE", str(tmp_path / "cache"))
    with pytest.warns(Note, match="dequantizing SmolLM2-135M-Instruct"):  # `note: ...` on the command line
        tokenizer, model = load_causal_lm("SmolLM2-135M-Instruct")
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(_source().parent, gguf_file=_GGUF_FILE, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    del reference
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _, again = load_causal_lm("smollm2")
    assert not [w for w in said if "dequantizing" in str(w.message)]
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.slow
def test_causal_lm_finetune_under_torchrun(llama_dir, tmp_path):
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    out = tmp_path / "ddp"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unilora",
         "finetune", "--model", str(llama_dir), "--data", str(data), "--method", "vblora", "--epochs", "1",
         "--no-progress", "--out", str(out)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["task"] == "causal-lm" and metrics["train_examples"] == 32
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_unilora_rate_is_fitted_to_the_model_unless_given(llama_dir, tmp_path, capsys):
    """The recipe's θ rate was tuned at D/d = 18.4 (MiniLM); on another model it scales with D/d,
    is printed and recorded; a rate the user gives is kept as given."""
    from unilora.store.io import read_adapter
    from unilora.training.recipes import GROUP_LRS, TUNED_SHARING

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    out = tmp_path / "fitted"
    capsys.readouterr()
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--theta-dim", "100", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    D = read_adapter(out / "adapter").layout.D
    expected = GROUP_LRS["unilora"]["theta"] * (D / 100) / TUNED_SHARING["unilora"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["group_lrs"]["theta"] == pytest.approx(expected)
    assert f"θ learning rate {expected:.3g}" in capsys.readouterr().err
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--theta-dim", "100", "--epochs", "1",
                 "--group-lr", "theta=0.01", "--no-progress", "--out", str(tmp_path / "given")]) == 0
    assert json.loads((tmp_path / "given" / "metrics.json").read_text())["settings"]["group_lrs"]["theta"] == 0.01
    assert "θ learning rate" not in capsys.readouterr().err


def test_the_tuned_minilm_setting_keeps_its_rate():
    from unilora.training.recipes import GROUP_LRS, fitted_group_lrs

    rates = {**GROUP_LRS["unilora"], "head": 5e-3}
    assert fitted_group_lrs("unilora", rates, 165_888, 9_000) == (rates, None)  # all-linear MiniLM, d = 9,000
    assert fitted_group_lrs("unilora", rates, 165_888, 23_040) == (rates, None)  # never lowered
    assert fitted_group_lrs("vblora", GROUP_LRS["vblora"], 10**6, 9_000) == (GROUP_LRS["vblora"], None)
    scaled, note = fitted_group_lrs("unilora", rates, 1_221_120, 9_000)  # SmolLM2-135M, all linear
    assert scaled["theta"] == pytest.approx(0.1472, abs=1e-4) and scaled["head"] == 5e-3 and "135.7" in note


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.update(kind="poem"), "task 'kind' must be one of"),
    (lambda t: t.update(task="summarise"), "task 'task' must be 'seq-cls' or 'causal-lm'"),
    (lambda t: t.update(metric="bleu"), "task 'metric' must be one of"),
    (lambda t: t.pop("kind"), "kind"),
])
def test_an_edited_task_record_is_refused(llama_dir, tmp_path, capsys, change, fragment):
    from conftest import edit_adapter_config

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--method", "lora", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    edit_adapter_config(out / "adapter", lambda meta: change(meta["task"]))
    one_line_error(["evaluate", str(out / "adapter")], capsys, fragment)
    one_line_error(["generate", str(out / "adapter"), "--prompt", "hi"], capsys, fragment)


def test_a_foreign_folder_at_the_cache_path_is_never_replaced(tmp_path, monkeypatch, capsys):
    from unilora.models.embedded_llm import EMBEDDED_LLM

    monkeypatch.setenv("UNILORA_CACHE", str(tmp_path))
    foreign = tmp_path / f"{EMBEDDED_LLM}-dequantized"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    one_line_error(["finetune", "--data", str(data), "--out", str(tmp_path / "run")], capsys,
                   "is not a model cache written by unilora")
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_new_users_text_run_says_what_it_did(llama_dir, tmp_path, capsys):
    """What a new user tripped on (plain text, VB-LoRA, all-linear): the run's plan in one note, the
    method's choice of b as a note and not a Python warning, the rates note not worded as an error,
    the resolved layer names in adapter_config.json, the bytes on disk as the files have them with
    both counts named, and evaluate on one new file with --test-data alone."""
    lines = [f"Speaker {i % 3} says the motion {'stands' if i % 2 else 'falls'} on point {i}." for i in range(60)]
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(lines) + "\n")  # documents: paragraphs
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--method", "vblora", "--targets",
                 "all-linear", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert "UserWarning" not in captured.err and "to fix it" not in captured.err
    plan = [line for line in errors if line.startswith("note: plan: ")]
    assert len(plan) == 1, errors
    assert "training documents" in plan[0] and "held out of 'train.txt' for testing (a seeded 20% split" in plan[0]
    assert "1 epoch = 1 optimizer step of about " in plan[0] and "learning rate 0.001 (bank 0.02, logits 0.02)" in plan[0]
    assert any(line.startswith("note: VB-LoRA: vector_length not given") for line in errors), errors

    folder = out / "adapter"
    weights = (folder / "adapter_model.safetensors").stat().st_size
    config_bytes = (folder / "adapter_config.json").stat().st_size
    printed = next(line for line in captured.out.splitlines() if line.startswith("adapter:"))
    assert f"weights {weights:,} bytes + config {config_bytes:,}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['stored_params']:,} stored params" in printed
    assert f"{metrics['trainable_params']:,} trained: training moves every sub-vector's logits" in printed

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["adapter"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                   "up_proj", "v_proj"]

    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(f"Speaker {i} answers point {i} at once." for i in range(12)) + "\n")
    assert main(["evaluate", "--json", str(folder), "--test-data", str(held)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["dataset"] == "held" and evaluated["test_examples"] >= 1 and evaluated["eval_loss"] > 0


def test_an_answer_ended_at_once_is_said_not_printed_blank(llama_dir, tmp_path, capsys, monkeypatch):
    from unilora.cli import commands
    from unilora.engine.generation import Generation, generate

    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    eos = model.generation_config.eos_token_id
    model.generation_config.suppress_tokens = [t for t in range(model.config.vocab_size) if t != eos]
    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    [answer] = generate(model, tokenizer, [[1, 2, 3]], max_new_tokens=4, batch_size=1)
    assert answer == "" and answer.new_tokens == 0

    monkeypatch.setattr(commands, "generate_from_adapter", lambda *a, **k: [Generation("", 0)])
    assert main(["generate", str(tmp_path), "--prompt", "Hello"]) == 0
    captured = capsys.readouterr()
    assert "note: the model ended its answer at once (0 tokens before its end token)" in captured.err


def test_generate_runs_an_adapter_saved_with_save_pretrained_on_its_recorded_base(llama_dir, tmp_path, capsys):
    """No task record: the base model the adapter records, and the prompt as the tokenizer encodes it
    (as the server's /v1/completions does)."""
    import unilora

    base = LlamaForCausalLM.from_pretrained(llama_dir)
    model = unilora.get_model(base, unilora.AdapterConfig(method="unilora", target_modules=["q_proj", "v_proj"],
                                                          theta_dim=300, seed=4))
    with torch.no_grad():
        model.projection.theta.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "mine")
    tokenizer = smollm2_tokenizer()
    ids = tokenizer("Tell me", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, max_new_tokens=5, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=tokenizer.pad_token_id)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "mine"), "--prompt", "Tell me", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # all 5 tokens came without an end token, so the answer was cut there, and the user is told
    assert tokenizer.eos_token_id not in out[0, ids.shape[1]:].tolist() and out.shape[1] - ids.shape[1] == 5
    assert "note: the answer was cut at --max-new-tokens 5; raise it for the whole answer" in printed.err


def test_the_plan_says_when_no_test_answers_are_scored(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    for metric, said in ((None, True), ("exact_match", False)):
        argv = ["finetune", "--model", str(llama_dir), "--data", str(data), "--method", "lora", "--epochs", "1",
                "--no-progress", "--out", str(tmp_path / f"run-{metric}")] + (["--metric", metric] if metric else [])
        capsys.readouterr()
        assert main(argv) == 0
        plan = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("note: plan: "))
        assert ("eval loss and perplexity only (no metric: --metric rougeL|accuracy|exact_match also generates the "
                "test answers and scores them)" in plan) is said, plan
