"""The schedule chosen from the run (unilora.training.plan) and the training loop's use of it: batch size
and epochs from the dataset size, evaluations, gradient clipping when asked, overrides, the record."""

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import VOCAB, build, method_options, one_line_error, small_bert
from unilora import AdapterConfig, get_model
from unilora.cli import main
from unilora.core.errors import UniLoraError
from unilora.training.plan import TARGET_STEPS, plan_run, short_run_warning
from unilora.training.loop import Task, TrainSettings, train



@pytest.mark.parametrize("n_train, batch, epochs", [
    (150, 8, 7),  # 19 steps per epoch
    (500, 16, 4),  # 32
    (2_000, 32, 2),  # 63: the budget the rates were tuned on
    (10_162, 32, 1),  # 318
    (12, 8, 40),  # 2 steps per epoch: capped
])
def test_classification_runs_get_about_the_tuned_number_of_steps(n_train, batch, epochs):
    settings = TrainSettings()
    chosen = plan_run(settings, "seq-cls", n_train)
    assert (settings.batch_size, settings.epochs) == (batch, epochs)
    assert {"batch_size", "epochs"} <= set(chosen)
    steps = settings.epochs * -(-n_train // batch)
    assert steps >= TARGET_STEPS or settings.epochs == 40


def test_what_the_user_sets_is_kept_and_not_reported_as_chosen():
    settings = TrainSettings(epochs=3, batch_size=4, max_grad_norm=0.0, eval_every=1)
    assert plan_run(settings, "seq-cls", 150) == {}
    assert (settings.epochs, settings.batch_size, settings.max_grad_norm, settings.eval_every) == (3, 4, 0.0, 1)
    # a given batch size still sets the epochs: 150 / 50 = 3 steps per epoch
    settings = TrainSettings(batch_size=50)
    assert set(plan_run(settings, "seq-cls", 150)) == {"epochs", "eval_every"}
    assert settings.epochs == 40


def test_no_clipping_unless_asked_and_causal_lm_keeps_its_defaults():
    settings = TrainSettings()
    assert "max_grad_norm" not in plan_run(settings, "seq-cls", 2_000)
    assert settings.max_grad_norm == 0.0
    causal = TrainSettings()
    plan_run(causal, "causal-lm", 96)
    assert (causal.batch_size, causal.epochs, causal.eval_every) == (8, 2, 1)


def test_a_causal_lm_student_passes_over_its_texts_once_in_more_steps():
    """The teacher's one pass over the texts is paid for by the student's pass it saves."""
    finetune, student = TrainSettings(), TrainSettings(group_by_length=None)
    plan_run(finetune, "causal-lm", 96)
    chosen = plan_run(student, "causal-lm", 96, lengths=[100] * 96, distill=True)
    assert (student.epochs, student.batch_size) == (1, 2) and "pays for the teacher's pass" in chosen["epochs"]
    steps = lambda s: s.epochs * -(-96 // s.batch_size)  # noqa: E731
    assert (steps(finetune), steps(student)) == (24, 48)
    given = TrainSettings(epochs=2, batch_size=8, group_by_length=None)  # the user's schedule is kept
    assert plan_run(given, "causal-lm", 96, lengths=[100] * 96, distill=True) == {}
    assert (given.epochs, given.batch_size) == (2, 8)


def test_a_short_run_set_by_the_user_is_warned_about():
    given = TrainSettings(epochs=3, batch_size=32)  # the finding: 150 examples, 3 epochs = 15 steps
    plan_run(given, "seq-cls", 150)
    assert "15 optimizer steps" in short_run_warning(given, "seq-cls", 150)
    assert "a lora_xs adapter may barely train" in short_run_warning(given, "seq-cls", 150, method="lora_xs")
    chosen = TrainSettings()
    plan_run(chosen, "seq-cls", 150)
    assert short_run_warning(chosen, "seq-cls", 150) is None
    assert short_run_warning(given, "causal-lm", 150) is None
    assert short_run_warning(TrainSettings(epochs=2, batch_size=32), "seq-cls", 2_000) is None


def test_ranks_share_the_data_so_each_needs_more_epochs():
    one, two = TrainSettings(), TrainSettings()
    plan_run(one, "seq-cls", 2_000, world=1)
    plan_run(two, "seq-cls", 2_000, world=2)
    assert (one.epochs, two.epochs) == (2, 4)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 2.0), ("eval_every", -1),
                                          ("warmup_ratio", 1.0), ("max_grad_norm", -1.0),
                                          ("max_grad_norm", float("nan")), ("max_grad_norm", True)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(UniLoraError, match=field):
        TrainSettings(**{field: value})


class _ScaledLossTask(Task):
    """Tiny causal-LM task whose loss is multiplied by `scale`, so gradient norms are large."""

    kind = "causal-lm"

    def __init__(self, scale: float):
        self.scale, self.evaluations = scale, 0
        generator = torch.Generator().manual_seed(0)
        self.train_examples = list(torch.randint(0, VOCAB, (16, 8), generator=generator))
        self.test_examples = []

    def batch(self, indices):
        ids = torch.stack([self.train_examples[i] for i in indices])
        return {"input_ids": ids, "labels": ids}

    def loss(self, model, batch):
        return self.scale * model(**batch).loss

    def evaluate(self, model, final):
        self.evaluations += 1
        return {}

    def summary(self, result):
        return "-"


def _train_and_watch_gradients(max_grad_norm: float, epochs: int = 1, eval_every: int | None = None):
    model = get_model(build("llama"), AdapterConfig(**method_options("vblora"), target_modules=["q_proj", "v_proj"]))
    task = _ScaledLossTask(scale=100.0)
    settings = TrainSettings(epochs=epochs, batch_size=4, max_grad_norm=max_grad_norm, eval_every=eval_every,
                             progress=False)
    seen = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        history = train(model, task, settings, model.parameter_groups(1e-3, {}, 0.0))
    finally:
        handle.remove()
    return seen, history, task


def test_clipping_bounds_the_gradient_the_optimizer_sees_and_the_norm_is_recorded():
    clipped, history, _ = _train_and_watch_gradients(max_grad_norm=0.5)
    free, free_history, _ = _train_and_watch_gradients(max_grad_norm=0.0)
    assert len(clipped) == len(free) == 4
    assert max(clipped) <= 0.5 * (1 + 1e-4)
    assert min(free) > 0.5  # so the bound above did something
    # the recorded norm is the one before clipping, the same in both runs at the first step
    assert history[0]["grad_norm_max"] >= free[0] * (1 - 1e-4)
    assert free_history[0]["grad_norm_max"] == pytest.approx(max(free), rel=1e-5)


def test_evaluations_follow_eval_every_and_the_last_epoch_is_always_evaluated():
    _, history, task = _train_and_watch_gradients(max_grad_norm=0.0, epochs=5, eval_every=2)
    assert [h["epoch"] for h in history] == [2, 4, 5] and task.evaluations == 3
    seconds = [h["train_seconds"] for h in history]  # time in optimizer steps so far, evaluations excluded
    assert 0 <= seconds[0] <= seconds[1] <= seconds[2]


def _padded_tokens(order, lengths, batch_size):
    return sum(max(lengths[i] for i in order[s : s + batch_size]) * len(order[s : s + batch_size])
               for s in range(0, len(order), batch_size))


@pytest.mark.parametrize("n, batch_size", [(1000, 8), (203, 4), (150, 4), (7, 32)])
def test_length_grouped_batches_are_a_shuffle_with_less_padding(n, batch_size):
    import random

    from unilora.data.batching import LENGTH_WINDOW, length_grouped, padded_tokens

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    grouped = length_grouped(order, lengths.__getitem__, batch_size, random.Random(1))
    assert sorted(grouped) == list(range(n))  # every example once
    assert _padded_tokens(grouped, lengths, batch_size) <= _padded_tokens(order, lengths, batch_size)
    assert padded_tokens(order, lengths.__getitem__, batch_size) == _padded_tokens(order, lengths, batch_size)
    batches = [grouped[s : s + batch_size] for s in range(0, n, batch_size)]
    if n <= LENGTH_WINDOW * batch_size:  # one window: the batches are the cuts of the sorted order
        longest_first = sorted(lengths, reverse=True)
        cuts = [longest_first[s : s + batch_size] for s in range(0, n, batch_size)]
        assert sorted(sorted(lengths[i] for i in b) for b in batches) == sorted(map(sorted, cuts))
    assert all(len(b) == batch_size for b in batches[:-1])  # a short batch only at the end
    if len(batches) > 2:
        assert length_grouped(order, lengths.__getitem__, batch_size, random.Random(2)) != grouped  # batch order is random


def test_distillation_groups_by_length_where_it_saves_padding_and_spends_it_on_epochs():
    import random

    from unilora.data.batching import grouped_share

    rng = random.Random(0)
    mixed = [rng.choice([10, 60]) for _ in range(2000)]  # short and long texts: grouping halves the padding
    share = grouped_share(mixed, 32, 0)
    assert share < 0.7
    settings = TrainSettings(group_by_length=None)
    chosen = plan_run(settings, "seq-cls", 2000, lengths=mixed, distill=True)
    assert settings.group_by_length and "group_by_length" in chosen
    assert settings.epochs == int(2 / share) > 2 and "costing no more than 2 shuffled ones" in chosen["epochs"]
    same = TrainSettings(group_by_length=None)  # all texts cut to one length: no epoch to gain, shuffled batches
    chosen = plan_run(same, "seq-cls", 2000, lengths=[64] * 2000, distill=True)
    assert "group_by_length" not in chosen and same.group_by_length is False
    # one pass fewer than the plan's 2 pays for the teacher's; smaller batches keep its 126 steps
    assert (same.epochs, same.batch_size) == (1, 15) and same.epochs * -(-2000 // 15) >= 126
    assert "one fewer than the plan's" in chosen["epochs"] and "126 optimizer steps" in chosen["batch_size"]
    epochs_given, no_grouping = TrainSettings(group_by_length=None, epochs=2), TrainSettings(group_by_length=False)
    for given in (epochs_given, no_grouping):
        plan_run(given, "seq-cls", 2000, lengths=mixed, distill=True)  # what the user set is kept
    assert (epochs_given.epochs, epochs_given.group_by_length) == (2, False)  # no epochs to spend the saving on
    assert (no_grouping.epochs, no_grouping.batch_size, no_grouping.group_by_length) == (1, 15, False)  # as `same`
    assert plan_run(TrainSettings(group_by_length=None), "seq-cls", 2000) == plan_run(TrainSettings(), "seq-cls", 2000)
    asked = TrainSettings(group_by_length=True)  # asked for, without lengths (finetune): grouped, the plan's epochs
    plan_run(asked, "seq-cls", 2000)
    assert (asked.epochs, asked.group_by_length) == (2, True)


def test_the_loop_trains_on_length_grouped_batches_when_asked():
    class Lengths(_ScaledLossTask):
        def __init__(self):
            super().__init__(scale=1.0)
            self.seen = []

        def train_length(self, index):
            return index % 5  # the examples' lengths, as the loop reads them

        def batch(self, indices):
            self.seen.append(list(indices))
            return super().batch(indices)

    model = get_model(build("llama"), AdapterConfig(**method_options("lora"), target_modules=["q_proj"]))
    for grouped in (False, True):
        task = Lengths()
        train(model, task, TrainSettings(epochs=2, batch_size=4, group_by_length=grouped, progress=False),
              model.parameter_groups(1e-3, {}, 0.0))
        assert len(task.seen) == 8 and all(sorted(sum(task.seen[e * 4 : e * 4 + 4], [])) == list(range(16))
                                           for e in range(2))
        spreads = [max(i % 5 for i in b) - min(i % 5 for i in b) for b in task.seen]
        assert (max(spreads) <= 1) == grouped  # 16 examples of lengths 0-4: sorted batches of 4 span one step


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return str(small_bert(tmp_path_factory.mktemp("model") / "small-bert"))


def test_finetune_prints_and_records_what_it_chose(small_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", small_model, "--method", "vblora", "--train-limit", "40", "--test-limit", "16",
                 "--eval-every", "100", "--no-progress", "--out", str(out)]) == 0
    note = capsys.readouterr().err
    assert "batch size 8" in note and "24 epochs = 120 optimizer steps" in note
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["plan"]) == {"batch_size", "epochs"}
    assert (metrics["settings"]["batch_size"], metrics["settings"]["epochs"]) == (8, 24)
    assert [h["epoch"] for h in metrics["history"]] == [24]  # --eval-every 100: the last epoch only
    assert metrics["history"][-1]["grad_norm_median"] > 0
    assert 0 < metrics["train_seconds"] <= metrics["seconds"]  # evaluation excluded


def test_finetune_options_override_the_plan(small_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", small_model, "--method", "vblora", "--train-limit", "40", "--test-limit", "16",
                 "--epochs", "1", "--batch-size", "20", "--max-grad-norm", "0.5", "--warmup-ratio", "0.5",
                 "--group-by-length", "--no-progress", "--out", str(out)]) == 0
    assert "note: batch size" not in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plan"] == {}
    settings = metrics["settings"]
    assert (settings["epochs"], settings["batch_size"], settings["max_grad_norm"], settings["warmup_ratio"],
            settings["group_by_length"]) == (1, 20, 0.5, 0.5, True)


@pytest.mark.parametrize("flag, value, says", [("--warmup-ratio", "1.5", "[0, 1)"), ("--warmup-ratio", "x", "number"),
                                               ("--max-grad-norm", "-1", ">= 0"), ("--max-grad-norm", "inf", "finite"),
                                               ("--eval-every", "0", "positive integer")])
def test_bad_schedule_options_get_one_line(flag, value, says, tmp_path, capsys):
    one_line_error(["finetune", flag, value, "--out", str(tmp_path / "o")], capsys, flag, says)
