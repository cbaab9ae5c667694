"""`unilora compress --adapter/--data`: a compact adapter trained to match a classifier's outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from unilora.cli import main
from unilora.io import read_adapter

from conftest import edit_adapter_weights
from test_demo import small_bert


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A LoRA classifier on a small random BERT (hidden 32), saved by `finetune`. A random BERT
    learns little in seconds, so its LoRA and head are then replaced by large random values: a
    teacher whose outputs differ clearly from the base model's."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)  # the random BERT, so the teacher is the same on every run
    model = small_bert(root / "small-bert")
    run = root / "lora"
    assert main(["finetune", "--model", str(model), "--method", "lora", "--train-limit", "96", "--test-limit", "64",
                 "--epochs", "1", "--batch-size", "32", "--no-progress", "--out", str(run)]) == 0
    generator = torch.Generator().manual_seed(0)

    def strong(tensors):
        for name in ("lora.weights", "head.classifier.weight"):
            tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.5

    edit_adapter_weights(run / "adapter", strong)
    return model, run


def _before_after(out: str, start: str) -> tuple[float, float]:
    line = next(line for line in out.splitlines() if line.startswith(start))
    fit, after = line.split("weight-space fit ")[1].split(", after distillation ")
    return float(fit), float(after)


def test_distillation_reduces_disagreement_and_carries_the_head(teacher_run, tmp_path, capsys):
    model, run = teacher_run
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--method", "unilora", "--theta-dim", "200",
                 "--train-limit", "96", "--test-limit", "64", "--epochs", "10", "--batch-size", "8",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    fit, after = _before_after(printed, "KL(teacher || student)")
    assert after < 0.5 * fit, printed  # matching outputs beats the weight-space fit at d << D
    assert _before_after(printed, "agreement with the teacher")[1] >= _before_after(printed, "agreement with")[0]
    assert "accuracy: teacher" in printed
    student, teacher = read_adapter(out), read_adapter(run / "adapter")
    assert student.config.method == "unilora" and student.config.theta_dim == 200
    for key, value in teacher.head.items():  # the teacher's trained head, unchanged
        assert torch.equal(student.head[key], value), key
    assert student.task["label_names"] == teacher.task["label_names"]
    assert student.task["compressed_from"].startswith("adapter:")
    recorded = student.task["distillation"]  # what was measured travels with the adapter
    assert recorded["distilled"]["kl_to_teacher"] == pytest.approx(after, rel=1e-3)
    assert recorded["weight_space_fit"]["kl_to_teacher"] == pytest.approx(fit, rel=1e-3)
    assert "student_accuracy" in recorded["base_model"] and recorded["settings"]["epochs"] == 10
    # used like any adapter: evaluate finds its model, data and labels in what it recorded
    capsys.readouterr()
    assert main(["evaluate", str(out), "--test-limit", "64"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    accuracy = float(printed.split("student ")[1].split(" ")[0])
    assert evaluated["test_accuracy"] == pytest.approx(accuracy)


def test_a_peft_export_with_its_head_is_a_teacher_too(teacher_run, tmp_path, capsys):
    model, run = teacher_run
    exported = tmp_path / "peft"
    assert main(["export", str(run / "adapter"), str(exported)]) == 0
    assert (exported / "head.safetensors").is_file()
    out, direct = tmp_path / "student", tmp_path / "direct"
    argv = ["--method", "vblora", "--num-vectors", "16", "--epochs", "1", "--batch-size", "16", "--no-progress",
            "--data", "rotten_tomatoes", "--train-limit", "96", "--test-limit", "64", "--model", str(model)]
    capsys.readouterr()
    assert main(["compress", str(out), "--peft-lora", str(exported), *argv]) == 0
    from_peft = capsys.readouterr().out
    assert main(["compress", str(direct), "--adapter", str(run / "adapter"), *argv]) == 0
    from_ours = capsys.readouterr().out
    # the merged PEFT teacher and our adapter are the same classifier: same teacher accuracy
    assert from_peft.split("accuracy: teacher ")[1][:6] == from_ours.split("accuracy: teacher ")[1][:6]
    head = load_file(str(exported / "head.safetensors"))
    student = read_adapter(out)
    assert all(torch.equal(student.head[k], v) for k, v in head.items())


def test_unlabelled_texts_are_enough(teacher_run, tmp_path, capsys):
    from unilora.data import rotten_tomatoes

    model, run = teacher_run
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(rotten_tomatoes().train_texts[:120]) + "\n")
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--data", str(texts), "--method", "unilora",
                 "--theta-dim", "200", "--epochs", "6", "--batch-size", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on 12 held-out texts" in printed and "accuracy:" not in printed  # 10 % held out; no labels to score
    fit, after = _before_after(printed, "KL(teacher || student)")
    assert after < fit, printed
    exported = tmp_path / "peft"
    assert main(["export", str(run / "adapter"), str(exported)]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "p"), "--peft-lora", str(exported), "--data", str(texts), "--model",
                 str(model), "--label-names", "0,1", "--method", "unilora", "--theta-dim", "200", "--epochs", "1",
                 "--no-progress"]) == 0


def test_distillation_input_errors_are_one_line(teacher_run, tmp_path, capsys):
    from test_hostile import one_line_error

    model, run = teacher_run
    out = str(tmp_path / "o")
    one_line_error(["compress", out, "--adapter", str(run / "adapter"), "--peft-lora", str(run), "--method",
                    "unilora"], capsys, "one teacher")
    one_line_error(["compress", out, "--peft-lora", str(run / "adapter"), "--data", "rotten_tomatoes", "--method",
                    "unilora", "--model", str(model)], capsys, "head.safetensors")
    exported = tmp_path / "peft"
    assert main(["export", str(run / "adapter"), str(exported)]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("a good film\na bad film\n")
    one_line_error(["compress", out, "--peft-lora", str(exported), "--data", str(texts), "--method", "unilora",
                    "--model", str(model)], capsys, "--label-names")
    one_line_error(["compress", out, "--peft-lora", str(exported), "--data", str(texts), "--method", "unilora",
                    "--model", str(model), "--label-names", "a,b,c"], capsys, "head.safetensors")
