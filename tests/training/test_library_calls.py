"""The command line is a thin front: each command's result is what one library call, made from
Python with the same options, gives."""

import json

import pytest
from safetensors.torch import load_file

from unilora import UniLoraError
from unilora.cli import main
from unilora.data.sources import DataSpec
from unilora.store.io import read_adapter
from unilora.tools.compress import weight_space_fit
from unilora.tools.counting import count_for_arch
from unilora.training.distill_run import distill_adapter
from unilora.training.runs import resolve_task, run_evaluate, run_finetune

from conftest import peft_lora_dir, small_bert
from test_distill import teacher_run  # noqa: F401 (fixture)


def same_weights(a, b) -> bool:
    """The same tensors, bit for bit (the files' bytes may differ: safetensors writes its header's
    metadata in no fixed order)."""
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    return ours.keys() == theirs.keys() and all(
        ours[k].dtype == theirs[k].dtype and ours[k].numpy().tobytes() == theirs[k].numpy().tobytes() for k in ours)


def config_without_checksums(folder) -> dict:
    """adapter_config.json without the checksums, which cover the weights file's header too."""
    meta = json.loads((folder / "adapter_config.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("weights_sha256", "config_sha256")}


def test_finetune_from_python_gives_the_commands_adapter_and_metrics(tmp_path, capsys):
    model = small_bert(tmp_path / "small-bert")
    options = dict(method="vblora", train_limit=40, test_limit=16, epochs=1)
    assert main(["finetune", "--model", str(model), "--method", "vblora", "--train-limit", "40", "--test-limit", "16",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    run = run_finetune(DataSpec(train_limit=options["train_limit"], test_limit=options["test_limit"]), model=str(model),
                       method=options["method"], epochs=options["epochs"], progress=False, out=tmp_path / "python")
    assert run.task == "seq-cls" and run.dataset.name == "rotten_tomatoes"
    assert same_weights(tmp_path / "cli" / "adapter", run.out / "adapter")
    cli_metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timings = ("seconds", "train_seconds", "history")
    assert {k: v for k, v in cli_metrics.items() if k not in timings} == \
        {k: v for k, v in run.metrics.items() if k not in timings}
    assert f"test accuracy: {run.metrics['test_accuracy']:.4f}" in printed
    # and the saved adapter is scored the same way by both
    capsys.readouterr()
    assert main(["evaluate", "--json", str(run.out / "adapter"), "--test-limit", "16", "--model", str(model)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        k: v for k, v in run_evaluate(run.out / "adapter", DataSpec(test_limit=16), str(model)).items() if k != "notes"}


def test_the_task_is_inferred_from_the_data_and_the_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("one document\n\nanother one\n")
    assert resolve_task(None, None, None) == ("seq-cls", "rotten_tomatoes", "all-MiniLM-L6-v2")
    assert resolve_task(None, str(text), None) == ("causal-lm", str(text), "SmolLM2-135M-Instruct")
    assert resolve_task("seq-cls", "bbc_news", "minilm") == ("seq-cls", "bbc_news", "minilm")


def test_distillation_from_python_gives_the_commands_student(teacher_run, tmp_path, capsys):  # noqa: F811
    model, run = teacher_run
    assert main(["compress", str(tmp_path / "cli"), "--adapter", str(run / "adapter"), "--method", "unilora",
                 "--theta-dim", "200", "--train-limit", "32", "--test-limit", "16", "--epochs", "1",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    student = distill_adapter(tmp_path / "python", adapter=run / "adapter", method="unilora",
                              fields={"theta_dim": 200}, data=DataSpec(train_limit=32, test_limit=16), epochs=1,
                              progress=False)
    assert same_weights(tmp_path / "cli", tmp_path / "python")
    recorded = read_adapter(tmp_path / "cli").task["distillation"]
    assert recorded["distilled"]["kl_to_teacher"] == student.summary["distilled"]["kl_to_teacher"]
    assert recorded["settings"] == student.summary["settings"]  # the plan chose alike (grouping left to it)
    assert f"after distillation {student.report['after']['agreement']:.4f}" in printed


def test_a_distillation_schedule_left_open_is_planned_alike(teacher_run, tmp_path, monkeypatch):  # noqa: F811
    """What the user leaves open (epochs, batch size, grouping) reaches the plan as open from both."""
    import unilora.training.distill as distill_module

    seen = []

    class Planned(Exception):
        pass

    def plan_run(settings, *args, **kwargs):
        seen.append((settings.epochs, settings.batch_size, settings.group_by_length, settings.eval_every))
        raise Planned

    monkeypatch.setattr(distill_module, "plan_run", plan_run)
    model, run = teacher_run
    with pytest.raises(Planned):
        main(["compress", str(tmp_path / "cli"), "--adapter", str(run / "adapter"), "--method", "unilora",
              "--train-limit", "16", "--test-limit", "8", "--no-progress"])
    with pytest.raises(Planned):
        distill_adapter(tmp_path / "python", adapter=run / "adapter", method="unilora",
                        data=DataSpec(train_limit=16, test_limit=8), progress=False)
    assert seen == [(None, None, None, None)] * 2


def test_a_weight_space_fit_from_python_gives_the_commands_adapter(tmp_path, capsys):
    _, peft_dir = peft_lora_dir(tmp_path)
    assert main(["compress", str(tmp_path / "cli"), "--peft-lora", str(peft_dir), "--method", "vblora",
                 "--num-vectors", "8", "--steps", "3"]) == 0
    printed = capsys.readouterr()
    report = weight_space_fit(tmp_path / "python", peft_lora=peft_dir, method="vblora", fields={"num_vectors": 8},
                              steps=3)
    assert config_without_checksums(tmp_path / "cli") == config_without_checksums(tmp_path / "python")
    assert same_weights(tmp_path / "cli", tmp_path / "python")
    assert f"after 3 refinement steps {report['relative_error_refined']:.4f}" in printed.out
    assert report["warning"] and report["warning"] in printed.err  # VB-LoRA keeps little of a random LoRA


def test_count_from_python_gives_the_commands_count(capsys):
    assert main(["count", "--arch", "roberta-base", "--method", "vblora", "--rank", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        str(count_for_arch("roberta-base", "qv", "vblora", rank=2)["stored_params"])


def test_the_same_options_give_the_same_errors(tmp_path, capsys):
    """A bad option combination is refused by the library, so Python callers get the CLI's error."""
    _, peft_dir = peft_lora_dir(tmp_path)
    assert main(["compress", str(tmp_path / "a"), "--peft-lora", str(peft_dir), "--targets", "q_proj"]) == 2
    error = capsys.readouterr().err.strip()
    with pytest.raises(UniLoraError) as refused:
        weight_space_fit(tmp_path / "b", peft_lora=peft_dir, targets=["q_proj"])
    assert error == f"error: {refused.value}" and "drop --targets" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
