"""`--data` from Hugging Face `datasets`, offline, on datasets made here: save_to_disk folders (Dataset
and DatasetDict), .parquet and .arrow files, Dataset objects in Python, ClassLabel names, messages and
prompt/completion columns, streaming, the errors, and the source recorded for `evaluate`."""

import json

import datasets
import huggingface_hub.constants
import pytest

from unilora import UniLoraError
from unilora.core.notes import Note
from unilora.cli import main
from unilora.data.hf import BUILTIN_NAMES, is_hf_data
from unilora.data.lm import BUILTIN_LM_TASKS, StreamedRows, is_lm_data
from unilora.data.sources import DataSpec
from unilora.data.text import BUILTIN_DATASETS, has_labels, texts_dataset
from unilora.training.runs import run_finetune

from serving import smollm2_tokenizer, write_tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer(), max_positions=512)


def reviews(n=60):
    """Reviews with a ClassLabel whose names are not in sorted order: the names must survive."""
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"])})
    return datasets.Dataset.from_dict({"text": [f"review {i}: {'awful' if i % 2 else 'great'} film" for i in range(n)],
                                       "label": [i % 2 for i in range(n)]}, features=features)


def conversations(n=40):
    return datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": f"Is {i} even or odd?"},
                                                     {"role": "assistant", "content": "even" if i % 2 == 0 else "odd"}]
                                                    for i in range(n)]})


def test_every_form_reads_as_the_same_classification_data(tmp_path):
    ds = reviews()
    split = datasets.DatasetDict({"train": ds.select(range(48)), "test": ds.select(range(48, 60))})
    split.save_to_disk(tmp_path / "dict")
    ds.save_to_disk(tmp_path / "one")
    ds.to_parquet(tmp_path / "reviews.parquet")
    for source in (str(tmp_path / "dict"), split):  # the set's own test split
        data = DataSpec(source).load("seq-cls")
        assert data.label_names == ["positive", "negative"], "a ClassLabel keeps its names and their order"
        assert (len(data.train_texts), len(data.test_texts)) == (48, 12)
        assert data.test_texts[1] == "review 49: awful film" and data.label_names[data.test_labels[1]] == "negative"
        assert data.source["test_split"] == "test" and data.source["fingerprint"]["train"]
    for source in (str(tmp_path / "one"), str(tmp_path / "reviews.parquet"), ds):  # one split: a seeded 20%
        data = DataSpec(source).load("seq-cls")
        assert (len(data.train_texts), len(data.test_texts)) == (48, 12) and data.source["test_split"] is None
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert len(DataSpec(str(arrow)).load("seq-cls").train_texts) == 48
    # GLUE's way: a test split without labels (-1); the labelled validation split tests instead
    unlabelled = ds.select(range(48, 60)).map(lambda row: {"label": -1})
    glue = datasets.DatasetDict({"train": ds.select(range(40)), "validation": ds.select(range(40, 48)),
                                 "test": unlabelled})
    with pytest.warns(Note, match="holds rows without labels"):
        data = DataSpec(glue).load("seq-cls")
    assert len(data.test_texts) == 8 and data.source["test_split"] == "validation"


def test_columns_pick_the_task_as_in_files(tmp_path):
    conversations().to_parquet(tmp_path / "chat.parquet")
    datasets.Dataset.from_dict({"prompt": ["1 + 1 ="] * 10, "completion": [" 2"] * 10}).save_to_disk(tmp_path / "pc")
    datasets.Dataset.from_dict({"text": ["a document"] * 10}).save_to_disk(tmp_path / "docs")
    reviews().save_to_disk(tmp_path / "labelled")
    assert is_lm_data(str(tmp_path / "chat.parquet")) and is_lm_data(str(tmp_path / "pc"))
    assert is_lm_data(str(tmp_path / "docs")) and not is_lm_data(str(tmp_path / "labelled"))
    chat = DataSpec(str(tmp_path / "chat.parquet")).load("causal-lm")
    assert chat.kind == "chat" and len(chat.train) == 32 and chat.train[0]["messages"][1]["role"] == "assistant"
    assert DataSpec(str(tmp_path / "pc")).load("causal-lm").kind == "prompt_completion"


def test_streaming_reads_rows_lazily_and_holds_out_the_first_ones(tmp_path):
    conversations(40).to_parquet(tmp_path / "chat.parquet")
    data = DataSpec(str(tmp_path / "chat.parquet"), streaming=True, test_limit=5).load("causal-lm")
    assert isinstance(data.train, StreamedRows) and len(data.train) == 35 and len(data.test) == 5
    assert [m["messages"][0]["content"] for m in data.test] == [f"Is {i} even or odd?" for i in range(5)]
    first, second = list(data.train.epoch(1)), list(data.train.epoch(2))
    assert len(first) == 35 and first != second, "each epoch reads the stream in a new order"
    assert sorted(r["messages"][0]["content"] for r in first) == sorted(f"Is {i} even or odd?" for i in range(5, 40))
    conversations(40).save_to_disk(tmp_path / "saved")  # an .arrow stream does not say how long it is
    arrow = str(next((tmp_path / "saved").glob("*.arrow")))
    with pytest.raises(UniLoraError, match="does not say how many rows it holds: give --train-limit"):
        DataSpec(arrow, streaming=True).load("causal-lm")
    assert len(DataSpec(arrow, streaming=True, train_limit=20).load("causal-lm").train) == 20


def test_bad_sources_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    reviews().save_to_disk(tmp_path / "one")
    datasets.Dataset.from_dict({"text": ["good", None, "bad"], "label": ["a", "b", "a"]}).to_parquet(tmp_path / "n.parquet")
    out = str(tmp_path / "run")
    cases = [
        (["--data", "someone/not-here"], "cannot load dataset 'someone/not-here' from the Hugging Face Hub"),
        (["--data", str(tmp_path / "one"), "--text-column", "body"], "column 'body' is not in"),
        (["--data", str(tmp_path / "one"), "--split", "validation"], "single split; --split goes with"),
        (["--data", str(tmp_path / "n.parquet")], "[split train] row 1: field 'text' is null"),
        (["--data", str(tmp_path / "missing.parquet")], "does not exist"),
        (["--data", str(tmp_path / "one"), "--streaming"], "read it without --streaming"),
    ]
    for options, fragment in cases:
        capsys.readouterr()
        assert main(["finetune", *options, "--out", out]) == 2, options
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, err
    assert "save_to_disk(FOLDER)" in main_error(["finetune", "--data", "someone/not-here", "--out", out], capsys)
    assert not is_hf_data(str(tmp_path / "typo.csv")), "a missing file is never taken for a hub id"
    assert set(BUILTIN_NAMES) == {*BUILTIN_DATASETS, *BUILTIN_LM_TASKS}  # nor is a built-in set
    assert not any(is_hf_data(name) for name in BUILTIN_NAMES)


def main_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_finetune_on_a_saved_dataset_records_it_and_evaluate_finds_it(llama_dir, tmp_path, capsys):
    dataset = conversations(40)
    datasets.DatasetDict({"train": dataset.select(range(32)), "validation": dataset.select(range(32, 40))}) \
        .save_to_disk(tmp_path / "chat")
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(tmp_path / "chat"), "--method", "lora",
                 "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 32 and metrics["test_examples"] == 8  # the validation split tests
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["task"]["data"]
    assert recorded["split"] == "train" and recorded["test_split"] == "validation"
    assert recorded["fingerprint"]["train"] == datasets.load_from_disk(str(tmp_path / "chat"))["train"]._fingerprint
    capsys.readouterr()
    assert main(["evaluate", "--json", str(out / "adapter")]) == 0  # found again from the record
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_python_datasets_and_streaming_train(llama_dir, tmp_path):
    run = run_finetune(DataSpec(conversations(30)), model=str(llama_dir), method="lora", epochs=1, progress=False,
                       out=tmp_path / "object")
    assert run.metrics["train_examples"] == 24 and run.metrics["test_examples"] == 6
    conversations(40).to_parquet(tmp_path / "chat.parquet")
    run = run_finetune(DataSpec(str(tmp_path / "chat.parquet"), streaming=True, train_limit=16, test_limit=4),
                       model=str(llama_dir), method="lora", epochs=2, batch_size=8, progress=False,
                       out=tmp_path / "stream")
    assert run.metrics["train_examples"] == 16 and run.metrics["test_examples"] == 4
    assert len(run.metrics["history"]) == 2 and run.metrics["history"][-1]["eval_loss"] > 0


def test_unlabelled_texts_for_distillation(tmp_path):
    datasets.Dataset.from_dict({"text": [f"text {i}" for i in range(50)]}).to_parquet(tmp_path / "texts.parquet")
    assert not has_labels(str(tmp_path / "texts.parquet"), "label")
    data = texts_dataset(str(tmp_path / "texts.parquet"), "text", ["neg", "pos"])
    assert (len(data.train_texts), len(data.test_texts)) == (45, 5) and data.label_names == ["neg", "pos"]
