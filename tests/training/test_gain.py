"""The share of the teacher's gain a student keeps (gain.py), and its interval over held-out texts."""

import pytest
import torch

from unilora.cli.commands import kept_gain_text as _kept_gain_text
from unilora.training.gain import kept_gain, kept_gain_interval


def _right_or_wrong(n: int, base: float, teacher: float, student: float, generator) -> tuple[torch.Tensor, ...]:
    """Per-text 1/0 scores of three classifiers with the given accuracies, correlated as a teacher
    and its student are: each model is right on a text where a shared uniform draw is below its
    accuracy, then the student's answer is flipped on a few texts of its own."""
    draw = torch.rand(n, generator=generator)
    scores = [(draw < accuracy).double() for accuracy in (base, teacher, student)]
    flips = torch.rand(n, generator=generator) < 0.04
    scores[2] = torch.where(flips, 1 - scores[2], scores[2])
    return tuple(scores)


def test_the_share_is_the_ratio_of_accuracy_differences():
    generator = torch.Generator().manual_seed(0)
    base, teacher, student = _right_or_wrong(500, 0.6, 0.8, 0.75, generator)
    accuracy = [float(s.mean()) for s in (base, teacher, student)]
    assert kept_gain(base, teacher, student) == pytest.approx((accuracy[2] - accuracy[0]) / (accuracy[1] - accuracy[0]))
    # a causal LM: minus each text's summed token loss gives the ratio of mean eval losses
    tokens = torch.randint(1, 30, (40,), generator=generator).double()
    losses = [tokens * (2.0 + torch.rand(40, generator=generator)) for _ in range(3)]
    mean = [float(loss.sum() / tokens.sum()) for loss in losses]
    assert kept_gain(*(-loss for loss in losses)) == pytest.approx((mean[0] - mean[2]) / (mean[0] - mean[1]))
    assert kept_gain(teacher, base, student) is None  # the "teacher" is worse than the base


def test_the_interval_holds_the_true_share_about_as_often_as_it_says():
    """Many held-out sets drawn from one population whose true share is known: the 95 % interval
    holds it in about 95 % of them (a wrong resampling, one not paired or with the wrong tail,
    falls far outside)."""
    generator = torch.Generator().manual_seed(1)
    population = _right_or_wrong(200_000, 0.66, 0.78, 0.76, generator)
    truth = kept_gain(*population)
    held, widths = 0, []
    for trial in range(200):
        rows = torch.randint(len(population[0]), (800,), generator=generator)
        sample = [s[rows] for s in population]
        interval = kept_gain_interval(*sample, resamples=500, seed=trial)
        assert interval is not None
        low, high = interval
        assert low <= kept_gain(*sample) <= high
        held += low <= truth <= high
        widths.append(high - low)
    assert 0.88 <= held / 200 <= 0.99, held
    # and it narrows as the held-out set grows: about 1 / sqrt(texts)
    rows = torch.randint(len(population[0]), (8_000,), generator=generator)
    low, high = kept_gain_interval(*(s[rows] for s in population), resamples=500)
    assert (high - low) < 0.5 * sorted(widths)[100]


def test_no_interval_when_the_teachers_gain_is_within_the_noise():
    generator = torch.Generator().manual_seed(2)
    base, teacher, student = _right_or_wrong(60, 0.70, 0.71, 0.71, generator)
    assert kept_gain_interval(base, teacher, student) is None
    with pytest.raises(ValueError, match="same 2 or more texts"):
        kept_gain_interval(base, teacher[:-1], student)


def test_the_printed_share_says_how_sure_it_is():
    assert _kept_gain_text(None, None, 10, "texts") == ""
    assert _kept_gain_text(0.9012, (0.8021, 1.0049), 2646, "texts") == (
        "; the student keeps 90.1 % of the teacher's gain over the base (95 % interval over the held-out texts: "
        "80.2-100.5 %)")
    assert "within the noise of 60 held-out texts" in _kept_gain_text(1.2, None, 60, "texts")


def test_every_measure_of_the_held_out_texts_gets_its_share():
    """A classifier is scored in accuracy and in eval loss on its labels: each measure's share uses
    its own scores (the base's from its own evaluation), accuracy first as the headline; a measure
    the teacher did not gain in has no share, whatever the other says."""
    from unilora.training.distill import _kept_gains

    generator = torch.Generator().manual_seed(1)
    base_acc, teacher_acc, student_acc = _right_or_wrong(300, 0.6, 0.8, 0.75, generator)
    base_loss, teacher_loss = torch.rand(300, generator=generator) + 0.5, torch.rand(300, generator=generator) + 0.2
    noise = 0.05 * torch.randn(300, generator=generator)
    student_loss = (base_loss + 3 * teacher_loss) / 4 + noise  # about three quarters of the way
    base = {"accuracy": {"model": base_acc}, "eval_loss": {"model": -base_loss}}
    last = {"accuracy": {"model": student_acc, "teacher": teacher_acc},
            "eval_loss": {"model": -student_loss, "teacher": -teacher_loss}}
    gains = _kept_gains(base, last)
    assert list(gains) == ["accuracy", "eval_loss"]
    assert gains["accuracy"]["kept"] == pytest.approx(kept_gain(base_acc, teacher_acc, student_acc))
    kept = float((base_loss - student_loss).sum() / (base_loss - teacher_loss).sum())  # the ratio of mean losses
    assert gains["eval_loss"]["kept"] == pytest.approx(kept) and 0.7 < kept < 0.8
    low, high = gains["eval_loss"]["interval"]
    assert low < kept < high
    last["eval_loss"]["teacher"] = -base_loss - 0.1  # a teacher worse than its base in loss
    assert _kept_gains(base, last)["eval_loss"] == {"kept": None, "interval": None}
    assert _kept_gains(None, last) == {} and _kept_gains(base, None) == {}  # no labels: nothing to score
