"""`unilora compress --adapter/--data`: a compact adapter trained to match a classifier's outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from unilora.cli import main
from unilora.store.io import read_adapter
from unilora.training.recipes import DISTILL_GROUP_LRS, GROUP_LRS

from conftest import edit_adapter_weights, one_line_error, small_bert
from test_causal_lm import chat_rows, llama_dir, tokenizer, write_jsonl  # noqa: F401 (fixtures)


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
                 "--eval-every", "5", "--no-progress"]) == 0
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
    base, last = recorded["base_model"]["student_accuracy"], recorded["distilled"]
    if last["teacher_accuracy"] > base:  # the share of the teacher's gain, and its interval around it
        kept = (last["student_accuracy"] - base) / (last["teacher_accuracy"] - base)
        assert recorded["kept_gain"] == pytest.approx(kept) and f"keeps {100 * kept:.1f} %" in printed
        interval = recorded["kept_gain_interval"]
        assert interval is None or interval[0] <= kept <= interval[1]
    else:
        assert recorded["kept_gain"] is None and recorded["kept_gain_interval"] is None
    # the same gain in eval loss on the labels: the mean cross-entropy of base, teacher and student
    by_measure = recorded["kept_gain_by_measure"]
    assert list(by_measure) == ["accuracy", "eval_loss"] and by_measure["accuracy"]["kept"] == recorded["kept_gain"]
    base_loss, teacher_loss = recorded["base_model"]["eval_loss"], last["teacher_eval_loss"]
    assert recorded["weight_space_fit"]["teacher_eval_loss"] == pytest.approx(teacher_loss)
    assert f"eval loss on the labels: teacher {teacher_loss:.4f}, student {last['eval_loss']:.4f}" in printed
    if teacher_loss < base_loss:
        kept = (base_loss - last["eval_loss"]) / (base_loss - teacher_loss)
        assert by_measure["eval_loss"]["kept"] == pytest.approx(kept, rel=1e-4)
    else:
        assert by_measure["eval_loss"] == {"kept": None, "interval": None}
    assert recorded["settings"]["eval_every"] == 5 and recorded["temperature"] == 1.0  # a classifier's defaults
    assert recorded["hidden_weight"] == 1.0 and recorded["hidden_layers"] == "all"
    # the student's own cost, apart from scoring teacher, base, fit and the evaluations
    assert 0 < recorded["distilled"]["train_seconds"] < recorded["seconds"]
    assert f"time: {recorded['distilled']['train_seconds']:.0f} s training the student" in printed
    assert 0 <= recorded["teacher_pass_seconds"] <= recorded["distilled"]["train_seconds"]  # inside the training time
    # used like any adapter: evaluate finds its model, data and labels in what it recorded
    capsys.readouterr()
    assert main(["evaluate", "--json", str(out), "--test-limit", "64"]) == 0
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
    # a classifier's VB-LoRA student trains its logits at distillation's rate, its bank at the recipe's
    rates = student.task["distillation"]["settings"]["group_lrs"]
    assert rates == {"bank": GROUP_LRS["vblora"]["bank"], "logits": DISTILL_GROUP_LRS["seq-cls"]["vblora"]["logits"]}
    assert rates["logits"] != GROUP_LRS["vblora"]["logits"]
    given = tmp_path / "given"  # a rate the user gives wins
    assert main(["compress", str(given), "--adapter", str(run / "adapter"), *argv, "--group-lr", "logits=1e-2"]) == 0
    assert read_adapter(given).task["distillation"]["settings"]["group_lrs"]["logits"] == 1e-2


def test_unlabelled_texts_are_enough(teacher_run, tmp_path, capsys):
    from unilora.data.text import rotten_tomatoes

    model, run = teacher_run
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(rotten_tomatoes().train_texts[:120]) + "\n")
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--data", str(texts), "--method", "unilora",
                 "--theta-dim", "200", "--epochs", "6", "--batch-size", "8", "--temperature", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert read_adapter(out).task["distillation"]["temperature"] == 2.0  # the user's
    assert "on 12 held-out texts" in printed and "accuracy:" not in printed  # 10 % held out; no labels to score
    fit, after = _before_after(printed, "KL(teacher || student)")
    assert after < fit, printed
    exported = tmp_path / "peft"
    assert main(["export", str(run / "adapter"), str(exported)]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "p"), "--peft-lora", str(exported), "--data", str(texts), "--model",
                 str(model), "--label-names", "0,1", "--method", "unilora", "--theta-dim", "200", "--epochs", "1",
                 "--no-progress"]) == 0


def test_matching_pooled_features_brings_the_students_closer_to_the_teachers(teacher_run, tmp_path, capsys):
    """With --hidden-weight the student also matches the head's input: on held-out texts its pooled
    features end closer to the teacher's than those of a student trained on the logits alone."""
    from unilora.training.classification import encode, predict
    from unilora.data.text import rotten_tomatoes
    from unilora.training.teachers import teacher_from_adapter

    model, run = teacher_run
    distance = {}
    for weight in ("0", "3"):
        out = tmp_path / f"hidden-{weight}"
        assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--method", "unilora", "--theta-dim",
                     "200", "--train-limit", "96", "--test-limit", "64", "--epochs", "6", "--batch-size", "8",
                     "--hidden-weight", weight, "--no-progress"]) == 0
        recorded = read_adapter(out).task["distillation"]
        assert recorded["hidden_weight"] == float(weight)
        assert recorded["hidden_layers"] == (None if weight == "0" else "all")  # no features matched at 0
        tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
        _, student = teacher_from_adapter(out, str(model))  # any adapter of ours runs merged
        texts = encode(tokenizer, rotten_tomatoes().test_texts[:64], 64)
        with torch.no_grad():
            target, taught = predict(teacher.model, tokenizer, texts, 32)[1], predict(student.model, tokenizer, texts, 32)[1]
        distance[weight] = float(((taught - target) ** 2).mean() / target.var(0).mean())
    assert distance["3"] < 0.3 * distance["0"], distance
    capsys.readouterr()


def test_the_classifier_pools_every_layer_when_asked(teacher_run):
    """With output_hidden_states the classifier returns every encoder layer's output pooled as the
    head's input is (the last one is that input); without, none."""
    from unilora.training.classification import build_classifier

    model, _ = teacher_run
    tokenizer, classifier = build_classifier(str(model), 2, 0)
    classifier.eval()
    inputs = tokenizer(["a short text", "and a longer second text to pool"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain, every = classifier(**inputs), classifier(**inputs, output_hidden_states=True)
        layers = classifier.encoder(**inputs, output_hidden_states=True).hidden_states[1:]
    assert plain.layer_pooled is None and every.layer_pooled.shape == (2, len(layers), 32)
    torch.testing.assert_close(every.layer_pooled[:, -1], plain.pooled)
    torch.testing.assert_close(every.logits, plain.logits)
    real = inputs["attention_mask"][0].bool()  # the first text's padding is left out of its mean
    torch.testing.assert_close(every.layer_pooled[0, 2], layers[2][0, real].mean(0))


def test_matching_every_layer_brings_the_students_inner_layers_closer(teacher_run, tmp_path, capsys):
    """With --hidden-layers all each encoder layer's pooled output is a target: on held-out texts
    the student's inner layers end closer to the teacher's than with the last layer's alone."""
    from unilora.training.classification import encode, predict
    from unilora.data.text import rotten_tomatoes
    from unilora.training.teachers import teacher_from_adapter

    model, run = teacher_run
    tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
    texts = encode(tokenizer, rotten_tomatoes().test_texts[:64], 64)
    target = predict(teacher.model, tokenizer, texts, 32, every_layer=True)[1]
    distance = {}
    for layers in ("last", "all"):
        out = tmp_path / layers
        assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--method", "unilora", "--theta-dim",
                     "200", "--train-limit", "96", "--test-limit", "16", "--epochs", "6", "--batch-size", "8",
                     "--hidden-weight", "3", "--hidden-layers", layers, "--no-progress"]) == 0
        assert read_adapter(out).task["distillation"]["hidden_layers"] == layers
        _, student = teacher_from_adapter(out, str(model))
        taught = predict(student.model, tokenizer, texts, 32, every_layer=True)[1]
        inner = (taught - target)[:, :-1].pow(2).mean((0, 2)) / target[:, :-1].var(0).mean(-1)
        distance[layers] = float(inner.mean())
    assert distance["all"] < 0.85 * distance["last"], distance  # 0.73 when written
    capsys.readouterr()


def test_the_features_unit_is_their_spread_and_stays_finite_without_one():
    from unilora.training.distill import feature_scale

    features = torch.randn(50, 3, 8) * torch.tensor([1.0, 2.0, 10.0]).view(1, 3, 1) + 5.0
    torch.testing.assert_close(feature_scale(features), features.var(0, unbiased=False).mean(-1))
    one_text = features[:1]  # no spread: the mean square, not a 1e-12 floor that makes any error huge
    torch.testing.assert_close(feature_scale(one_text), one_text.pow(2).mean((0, 2)))
    assert feature_scale(torch.zeros(4, 2, 8)).min() > 0


def test_every_layers_features_that_would_not_fit_fall_back_or_are_refused(capsys):
    """The teacher's pooled features of every layer are kept for every training text: past the
    budget the default matches the head's input alone (and says so); an explicit "all" is refused."""
    from types import SimpleNamespace

    from unilora.core.errors import UniLoraError
    from unilora.core.notes import Note
    from unilora.training.distill import layers_to_match

    minilm = SimpleNamespace(num_hidden_layers=6, hidden_size=384)  # 9 KiB a text
    assert layers_to_match(None, 2000, minilm) == "all" and layers_to_match("last", 10**9, minilm) == "last"
    assert capsys.readouterr().err == ""
    with pytest.warns(Note, match=r"\(--hidden-layers last\)"):  # a note (the CLI prints it as `note: ...`)
        assert layers_to_match(None, 2000, minilm, budget=1 << 20) == "last"
    with pytest.raises(UniLoraError, match="give fewer texts"):
        layers_to_match("all", 2000, minilm, budget=1 << 20)


def test_a_student_trains_without_the_frozen_models_dropout(teacher_run):
    """The student's training forwards are the forwards it is scored by: the frozen base model's
    dropout is off (finetune keeps it on), the adapter's own dropout and training-only selection
    still act."""
    from unilora import AdapterConfig, get_model
    from unilora.training.classification import build_classifier
    from unilora.training.distill import student_train_mode
    from unilora.training.loop import Task

    model, _ = teacher_run
    tokenizer, base = build_classifier(str(model), 2, 0)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())  # BERT's 0.1
    inputs = tokenizer(["a first text to classify", "and a second one"], return_tensors="pt", padding=True)
    student = get_model(base, AdapterConfig(method="unilora", theta_dim=300, rank=4, target_modules="all-linear",
                                            modules_to_save=["classifier"]))
    student.eval()
    with torch.no_grad():
        scored = student(**inputs).logits
    finetune_mode = lambda m: Task.train_mode(None, m)  # noqa: E731 (the shared loop's default)
    for train_mode, deterministic in ((student_train_mode, True), (finetune_mode, False)):
        train_mode(student)
        assert student.training and student.projection.training
        with torch.no_grad():
            outputs = [student(**inputs).logits for _ in range(2)]
        assert all(torch.allclose(out, scored, atol=1e-6) == deterministic for out in outputs), train_mode
    noisy = get_model(build_classifier(str(model), 2, 0)[1],
                      AdapterConfig(method="lora", rank=4, target_modules="all-linear", dropout=0.5))
    with torch.no_grad():
        for p in noisy.projection.parameters():
            p.normal_()  # B = 0 at init would hide the adapter's dropout
    student_train_mode(noisy)
    with torch.no_grad():
        assert not torch.allclose(noisy(**inputs).logits, noisy(**inputs).logits)  # the adapter's dropout acts


def test_a_student_equal_to_its_teacher_has_nothing_to_learn(teacher_run, tmp_path, capsys):
    """A LoRA student of the teacher's rank starts from the exact weight-space fit, so it is the
    teacher: its training loss is zero (with the base's dropout on it would not be)."""
    model, run = teacher_run
    out = tmp_path / "same"
    assert main(["compress", str(out), "--adapter", str(run / "adapter"), "--method", "lora", "--rank", "8",
                 "--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--batch-size", "16",
                 "--group-lr", "lora=1e-9", "--no-progress"]) == 0
    recorded = read_adapter(out).task["distillation"]
    assert recorded["weight_space_fit"]["kl_to_teacher"] < 1e-6
    assert recorded["distilled"]["train_loss"] < 1e-6 and recorded["distilled"]["agreement"] == 1.0
    capsys.readouterr()


def test_distillation_input_errors_are_one_line(teacher_run, tmp_path, capsys):

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
    # the student adapts the teacher's layers: a choice of layers would do nothing
    one_line_error(["compress", out, "--adapter", str(run / "adapter"), "--method", "unilora", "--targets", "query"],
                   capsys, "drop --targets")


def test_the_weight_space_start_takes_the_refinement_options(teacher_run, tmp_path, monkeypatch, capsys):
    """--steps and --lr refine the distillation's starting point as they refine a weight-space fit."""
    import unilora.training.distill

    model, run = teacher_run
    seen = []
    fit = unilora.training.distill.compress
    monkeypatch.setattr(unilora.training.distill, "compress", lambda *a, **k: seen.append(k) or fit(*a, **k))
    assert main(["compress", str(tmp_path / "s"), "--adapter", str(run / "adapter"), "--method", "unilora",
                 "--theta-dim", "200", "--train-limit", "16", "--test-limit", "16", "--epochs", "1",
                 "--steps", "3", "--lr", "0.05", "--no-progress"]) == 0
    assert seen == [{"steps": 3, "lr": 0.05}]
    capsys.readouterr()


def test_the_teacher_runs_once_per_training_text(teacher_run):
    """Its logits for all training texts are computed in one pass at the first batch; any later
    batch reads the logits the teacher gives that text alone."""
    from unilora.data.text import TextDataset, rotten_tomatoes
    from unilora.training.distill import DistillTask
    from unilora.training.teachers import teacher_from_adapter

    model, run = teacher_run
    tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
    texts = rotten_tomatoes().train_texts[:12]
    task = DistillTask(teacher, tokenizer, TextDataset("t", ["0", "1"], texts, [], texts[:4], []), 64)
    calls = []
    teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
    task.batch([0, 1, 2, 3])
    assert calls == [12]  # every training text, once
    mixed = task.batch([5, 0, 4, 3, 11])
    task.batch([11, 1, 5])
    assert calls == [12]
    with torch.no_grad():
        for row, i in zip(mixed["teacher"], [5, 0, 4, 3, 11]):
            alone = teacher.model(**tokenizer([texts[i]], truncation=True, max_length=64, return_tensors="pt"))
            torch.testing.assert_close(row, alone.logits[0].float(), atol=1e-5, rtol=1e-4)


def test_a_classifier_is_scored_per_text_in_accuracy_and_eval_loss(teacher_run):
    """Each held-out text gets two scores, the model's and the teacher's, for each measure of the
    gain: 1 or 0 for a right or wrong answer, and minus its cross-entropy on the label, as the
    model gives it on that text alone."""
    from unilora.data.text import TextDataset, rotten_tomatoes
    from unilora.training.classification import build_classifier
    from unilora.training.distill import DistillTask
    from unilora.training.teachers import teacher_from_adapter

    model, run = teacher_run
    tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
    data = rotten_tomatoes()
    texts, labels = data.test_texts[:10], data.test_labels[:10]
    task = DistillTask(teacher, tokenizer, TextDataset("t", ["0", "1"], texts[:2], [], texts, labels), 64)
    _, base = build_classifier(str(model), 2, 0)
    with torch.no_grad():
        base.classifier.load_state_dict(teacher.head)
    result = task.evaluate(base.eval(), final=False)
    assert list(task.text_scores) == ["accuracy", "eval_loss"]
    for who, scored in (("model", base), ("teacher", teacher.model)):
        with torch.no_grad():
            alone = torch.cat([scored(**tokenizer([text], truncation=True, max_length=64, return_tensors="pt")).logits
                               for text in texts]).float()
        truth = torch.tensor(labels)
        scores = task.text_scores
        assert torch.equal(scores["accuracy"][who], (alone.argmax(-1) == truth).float())
        own = -torch.nn.functional.cross_entropy(alone, truth, reduction="none").double()
        torch.testing.assert_close(scores["eval_loss"][who], own, atol=1e-5, rtol=1e-4)
    assert result["eval_loss"] == pytest.approx(float(-task.text_scores["eval_loss"]["model"].mean()))
    assert result["teacher_eval_loss"] == pytest.approx(float(-task.text_scores["eval_loss"]["teacher"].mean()))
    assert result["eval_loss"] != pytest.approx(result["teacher_eval_loss"])  # the teacher differs from its base


def test_a_teacher_from_our_adapter_runs_merged_and_gives_the_adapters_outputs(teacher_run):
    from unilora import AdaptedModel
    from unilora.training.classification import build_classifier
    from unilora.training.teachers import teacher_from_adapter

    model, run = teacher_run
    tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
    assert not isinstance(teacher.model, AdaptedModel)  # a plain model: no adapter work per forward
    _, classifier = build_classifier(str(model), 2, 0)
    reference = AdaptedModel.from_pretrained(classifier, run / "adapter").eval()  # as a user loads it
    inputs = tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-4)


# --- causal-LM teachers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_teacher(llama_dir, tmp_path_factory):
    """A LoRA on a tiny random Llama trained by `finetune` on chat data, its update then replaced by
    large random values (a tiny random model learns little in seconds): a teacher whose outputs
    differ clearly from the base model's."""
    root = tmp_path_factory.mktemp("lm-teacher")
    data = write_jsonl(root / "chat.jsonl", chat_rows(60))
    run = root / "lora"
    assert main(["finetune", "--model", str(llama_dir), "--data", str(data), "--method", "lora", "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--out", str(run)]) == 0
    generator = torch.Generator().manual_seed(1)

    def strong(tensors):
        tensors["lora.weights"] = torch.randn(tensors["lora.weights"].shape, generator=generator) * 0.5

    edit_adapter_weights(run / "adapter", strong)
    return run / "adapter"


def test_a_causal_lm_adapter_is_distilled_on_its_own_data(lm_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--adapter", str(lm_teacher), "--method", "unilora", "--theta-dim", "300",
                 "--epochs", "6", "--batch-size", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    fit, after = _before_after(printed, "KL(teacher || student), nats per predicted token")
    assert after < 0.5 * fit, printed
    assert "agreement with the teacher's most likely next token on 12 held-out examples" in printed
    assert "eval loss: teacher" in printed and "head carried" not in printed
    student = read_adapter(out)
    assert student.config.method == "unilora" and student.task["task"] == "causal-lm"
    assert student.config.modules_to_save in (None, [])
    recorded = student.task["distillation"]
    assert recorded["distilled"]["kl_to_teacher"] == pytest.approx(after, rel=1e-3)
    assert recorded["hidden_weight"] == 0.0 and recorded["hidden_layers"] is None  # next-token distributions only
    teacher_loss = recorded["distilled"]["teacher_eval_loss"]  # the student's eval loss moves to the teacher's
    assert abs(recorded["distilled"]["eval_loss"] - teacher_loss) < abs(recorded["weight_space_fit"]["eval_loss"]
                                                                          - teacher_loss)
    # evaluate finds the teacher's data and split in the record and scores what distillation scored
    capsys.readouterr()
    assert main(["evaluate", "--json", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval_loss"] == pytest.approx(recorded["distilled"]["eval_loss"], rel=1e-4)


def test_a_causal_lm_student_plans_small_batches_and_runs_the_rest_in_finetunes(lm_teacher, tmp_path, capsys,
                                                                               monkeypatch):
    """Left to the plan, a causal-LM student trains one epoch in batches of 2 (plan.py); the
    teacher's pass, the evaluations and the generations still run in batches of 8."""
    import unilora.training.distill as distill_module

    no_grad_batches, original = [], distill_module.batches_by_length

    def batches_by_length(examples, pad_id, batch_size):
        no_grad_batches.append(batch_size)
        return original(examples, pad_id, batch_size)

    monkeypatch.setattr(distill_module, "batches_by_length", batches_by_length)
    out = tmp_path / "student"
    assert main(["compress", str(out), "--adapter", str(lm_teacher), "--method", "unilora", "--theta-dim", "300",
                 "--no-progress"]) == 0
    assert "batch size 2 (causal LM distillation); 1 epoch" in capsys.readouterr().err
    recorded = read_adapter(out).task["distillation"]
    assert (recorded["settings"]["batch_size"], recorded["settings"]["epochs"]) == (2, 1)
    assert recorded["temperature"] == 2.0
    assert no_grad_batches and set(no_grad_batches) == {8}


def test_teacher_and_data_of_different_tasks_are_refused(lm_teacher, teacher_run, tmp_path, capsys):

    out = tmp_path / "o"
    one_line_error(["compress", str(out), "--adapter", str(lm_teacher), "--data", "rotten_tomatoes", "--method",
                    "unilora"], capsys, "'rotten_tomatoes' is classification data and the teacher is a causal LM")
    one_line_error(["compress", str(out), "--adapter", str(teacher_run[1] / "adapter"), "--data", "bbc_headlines",
                    "--method", "unilora"], capsys, "'bbc_headlines' is causal-LM data and the teacher is a classifier")
    for teacher in (lm_teacher, teacher_run[1] / "adapter"):  # an option that would do nothing is refused
        one_line_error(["compress", str(out), "--adapter", str(teacher), "--label-names", "a,b", "--method",
                        "unilora"], capsys, "other teachers record their classes or have none")
    for option in (["--hidden-weight", "1"], ["--hidden-layers", "all"]):
        one_line_error(["compress", str(out), "--adapter", str(lm_teacher), *option, "--method", "unilora"],
                       capsys, "a causal LM student matches its teacher's next-token distributions only")
    one_line_error(["compress", str(out), "--adapter", str(teacher_run[1] / "adapter"), "--hidden-layers", "all",
                    "--hidden-weight", "0", "--method", "unilora"], capsys, "the weight is 0")
    assert not out.exists()


def test_a_peft_lora_on_a_causal_lm_is_a_teacher(llama_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from unilora.training.teachers import teacher_from_peft_lora

    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(llama_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(peft_dir)
    _, teacher = teacher_from_peft_lora(peft_dir, None, str(llama_dir))
    ids = torch.tensor([[1, 2, 3, 400, 5000, 60]])
    with torch.no_grad():  # the LoRA merged into the teacher's copy of the base model gives PEFT's outputs
        assert (teacher.model(input_ids=ids).logits - peft_model.eval()(input_ids=ids).logits).abs().max() < 1e-5
    assert teacher.kind == "causal-lm" and teacher.updates[0].name == "model.layers.0.self_attn.q_proj"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the river rose {i} inches before the bridge." for i in range(40)))
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--peft-lora", str(peft_dir), "--data", str(corpus), "--max-length", "32",
                 "--method", "vblora", "--epochs", "3", "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    fit, after = _before_after(printed, "KL(teacher || student)")
    assert after < fit, printed
    student = read_adapter(out)
    assert student.task["compressed_from"].startswith("peft-lora:") and student.task["kind"] == "text"
    assert student.task["distillation"]["settings"]["group_lrs"] == GROUP_LRS["vblora"]  # a causal LM's: the recipe's
    assert sorted(student.config.target_modules)[0] == "model.layers.0.self_attn.q_proj"


def test_a_peft_lora_on_gpt2_conv1d_layers_is_a_teacher(tokenizer, tmp_path, capsys):
    """GPT-2 keeps its projections in Conv1D layers (weight in × out): PEFT's LoRA on them is merged
    transposed, gives PEFT's outputs, and distils like any other."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from unilora.training.teachers import teacher_from_peft_lora

    folder = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(folder), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False,
        task_type="CAUSAL_LM"))
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(peft_dir)
    _, teacher = teacher_from_peft_lora(peft_dir, None, str(folder))
    ids = torch.tensor([[1, 2, 3, 400, 5000, 60]])
    with torch.no_grad():
        assert (teacher.model(input_ids=ids).logits - peft_model.eval()(input_ids=ids).logits).abs().max() < 1e-5
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the river rose {i} inches before the bridge." for i in range(40)))
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--peft-lora", str(peft_dir), "--data", str(corpus), "--max-length", "32",
                 "--method", "unilora", "--theta-dim", "300", "--epochs", "3", "--batch-size", "4",
                 "--no-progress"]) == 0
    fit, after = _before_after(capsys.readouterr().out, "KL(teacher || student)")
    assert after < fit
    assert sorted(read_adapter(out).config.target_modules)[0] == "transformer.h.0.attn.c_attn"


def test_a_fully_fine_tuned_causal_lm_is_a_teacher(llama_dir, teacher_run, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from unilora.training.teachers import teacher_from_finetuned

    base, tuned = LlamaForCausalLM.from_pretrained(llama_dir), LlamaForCausalLM.from_pretrained(llama_dir)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a "full fine-tune": every matrix changed, embeddings included
        for p in tuned.parameters():
            if p.dim() == 2:
                p += torch.randn(p.shape, generator=generator) * 0.05
    folder = tmp_path / "tuned"
    tuned.save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(folder)
    _, teacher = teacher_from_finetuned(folder, str(llama_dir), "all-linear", 4)
    ids = torch.tensor([[1, 2, 3, 400, 5000, 60]])
    with torch.no_grad():  # the teacher is the fine-tuned model itself
        torch.testing.assert_close(teacher.model(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits)
    assert len(teacher.updates) == 14  # 7 linear layers in each of 2 blocks; not the tied output layer
    update = teacher.updates[0]
    assert update.name == "model.layers.0.self_attn.q_proj"
    delta = tuned.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    singular = torch.linalg.svdvals(delta.detach())  # the best rank-4 approximation of the change
    error = torch.linalg.matrix_norm(delta.detach() - update.b @ update.a)
    assert error == pytest.approx(float(singular[4:].square().sum().sqrt()), rel=1e-3)

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the river rose {i} inches before the bridge." for i in range(40)))
    out = tmp_path / "student"
    capsys.readouterr()
    assert main(["compress", str(out), "--finetuned-model", str(folder), "--model", str(llama_dir), "--data",
                 str(corpus), "--max-length", "32", "--method", "unilora", "--theta-dim", "300", "--epochs", "3",
                 "--batch-size", "4", "--no-progress"]) == 0
    fit, after = _before_after(capsys.readouterr().out, "KL(teacher || student)")
    assert after < fit
    student = read_adapter(out)
    assert student.task["compressed_from"] == f"finetuned:{folder}" and student.task["model"] == str(llama_dir)
    assert len(student.config.target_modules) == 14

    one_line_error(["compress", str(tmp_path / "o"), "--finetuned-model", str(folder), "--data", str(corpus),
                    "--method", "unilora"], capsys, "--finetuned-model needs --model BASE")
    one_line_error(["compress", str(tmp_path / "o"), "--finetuned-model", str(teacher_run[0]), "--model",
                    str(llama_dir), "--data", str(corpus), "--method", "unilora"], capsys, "is not a causal LM")


def test_a_causal_lm_teacher_runs_once_per_text_and_its_kept_outputs_are_its_own(lm_teacher):
    """The training texts' next-token distributions are computed in one pass at the first batch and
    read after that (past the cache's budget they are recomputed in their batches, the same); the
    held-out texts are scored by the teacher once, however often the student is evaluated."""
    from unilora.data.lm_tokens import collate
    from unilora.training.causal_lm import lm_dataset_of
    from unilora.training.distill import LMDistillTask
    from unilora.training.loop import TrainSettings
    from unilora.training.teachers import teacher_from_adapter

    tokenizer, teacher = teacher_from_adapter(lm_teacher)
    dataset = lm_dataset_of(teacher.record, lm_teacher)
    task = LMDistillTask(teacher, tokenizer, dataset, TrainSettings(batch_size=4, epochs=1))
    calls = []
    teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
    task.batch([0, 1, 2])
    assert sum(calls) == task.train_size() and max(calls) <= 4  # every text once, in batches of 4
    calls.clear()
    mixed = task.batch([4, 0, 3, 2])
    assert calls == []
    alone = [collate([task.train_examples[i]], tokenizer.pad_token_id) for i in (4, 0, 3)]
    with torch.no_grad():  # text 3's rows, read back in a mixed batch, are what the teacher gives it alone
        logits, _ = task._target_logits(teacher.model, alone[2])
    expected = torch.log_softmax(logits / task.temperature, -1)
    start = sum(len(task._target_logits(teacher.model, one)[1]) for one in alone[:2])
    rows = torch.log_softmax(mixed["teacher"][start : start + len(expected)].float(), -1)
    torch.testing.assert_close(rows, expected, atol=2e-2, rtol=2e-3)  # float16, renormalised
    calls.clear()
    small = LMDistillTask(teacher, tokenizer, dataset, TrainSettings(batch_size=4, epochs=1), budget=0)
    again = small.batch([4, 0, 3, 2])  # nothing fits: the pass stops at once, the batch runs the teacher
    assert calls == [4, 4]  # one float16 step apart at most (other padding in the batch)
    torch.testing.assert_close(again["teacher"].float(), mixed["teacher"].float(), atol=1e-2, rtol=0)
    calls.clear()
    task.evaluate(teacher.model, final=False)  # the teacher as its own student: teacher and student run
    first = len(calls)
    result = task.evaluate(teacher.model, final=False)  # the student only
    assert first > 0 and len(calls) == first + first // 2
    assert result["agreement"] == 1.0 and abs(result["kl_to_teacher"]) < 1e-4
    assert result["eval_loss"] == pytest.approx(result["teacher_eval_loss"], rel=1e-5)
    # one score per held-out text for the kept gain's interval: minus that text's own summed loss
    alone = [collate([example], tokenizer.pad_token_id) for example in task.test_examples]
    with torch.no_grad():
        own = [task._target_logits(teacher.model, one) for one in alone]
    losses = sorted(float(torch.nn.functional.cross_entropy(*pair, reduction="sum")) for pair in own)
    assert list(task.text_scores) == ["eval_loss"]  # a causal LM's one measure
    scores = task.text_scores["eval_loss"]
    torch.testing.assert_close(sorted((-scores["model"]).tolist()), losses, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(scores["teacher"], scores["model"], atol=1e-3, rtol=1e-4)
    tokens = sum(len(targets) for _, targets in own)
    assert float(-scores["model"].sum()) / tokens == pytest.approx(result["eval_loss"], rel=1e-6)


def test_distillation_plans_with_the_lengths_of_its_texts(teacher_run, tmp_path, monkeypatch, capsys):
    """`compress` leaves grouping to the plan (None, so it can pay for epochs) and gives it the
    token count of every training text, as encoded for the student."""
    import unilora.training.distill as distill_module
    from unilora.training.classification import dataset_of, encode
    from unilora.training.teachers import teacher_from_adapter

    seen = {}

    class Planned(Exception):
        pass

    def plan_run(settings, kind, n_train, world=1, lengths=None, distill=False):
        seen.update(group_by_length=settings.group_by_length, n_train=n_train, lengths=lengths, distill=distill)
        raise Planned

    monkeypatch.setattr(distill_module, "plan_run", plan_run)
    model, run = teacher_run
    with pytest.raises(Planned):
        main(["compress", str(tmp_path / "s"), "--adapter", str(run / "adapter"), "--method", "unilora",
              "--train-limit", "40", "--test-limit", "8", "--no-progress"])
    assert seen["group_by_length"] is None and seen["n_train"] == 40 and seen["distill"]
    tokenizer, teacher = teacher_from_adapter(run / "adapter", str(model))
    texts = dataset_of(teacher.record, run / "adapter").limited(40, 8, seed=0).train_texts
    assert seen["lengths"] == [len(e) for e in encode(tokenizer, texts, 64)] and len(set(seen["lengths"])) > 1
