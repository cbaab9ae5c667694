"""The share of a teacher's gain over the base model that a distilled student keeps, and how far
that share can be trusted on the held-out texts it was measured on.

Each model gets one score per held-out text and measure, higher is better: 1 or 0 for a
classifier's right or wrong answer, minus its cross-entropy on the label for a classifier's eval
loss, minus the summed token loss for a causal LM. Every model is scored on the same texts (and,
for a causal LM, the same tokens), so the share of the gain is

    kept = sum(student - base) / sum(teacher - base)

which equals the ratio of accuracy (or mean eval loss) differences. On Rotten Tomatoes a teacher
gains 6-11 accuracy points over its base, so one text of 2,646 moves the share by about half a
point: a per-run interval says whether a difference between two runs is more than that noise.
"""

import math

import torch

RESAMPLES = 2000
LEVEL = 0.95


def kept_gain(base: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor) -> float | None:
    """The share of the teacher's gain the student keeps; None when the teacher gained nothing."""
    gain = float((teacher - base).double().sum())
    return float((student - base).double().sum()) / gain if gain > 0 else None


def kept_gain_interval(base: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor,
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """A paired percentile-bootstrap interval of `kept_gain` over the held-out texts (the same
    resampled texts score all three models). None when the teacher's gain itself is not clear: in
    more than the interval's tail share of resamples it is not positive, so the share has no bound."""
    if not (len(base) == len(teacher) == len(student)) or len(base) < 2:
        raise ValueError("the base, teacher and student need one score each on the same 2 or more texts")
    generator = torch.Generator().manual_seed(seed)
    teacher_gain, student_gain = (teacher - base).double(), (student - base).double()
    gain, kept = [], []
    step = max(1, 2**22 // len(base))  # resamples at a time: 32 MiB of row indices however many texts
    for start in range(0, resamples, step):
        rows = torch.randint(len(base), (min(step, resamples - start), len(base)), generator=generator)
        gain.append(teacher_gain[rows].sum(1))
        kept.append(student_gain[rows].sum(1))
    gain, kept = torch.cat(gain), torch.cat(kept)
    # a resample in which the teacher gained nothing gives an unbounded share: it sorts to the top
    shares = torch.where(gain > 0, kept / gain.clamp(min=1e-12), torch.tensor(float("inf"), dtype=torch.float64))
    shares = shares.sort().values
    tail = (1 - level) / 2
    low, high = shares[int(tail * (resamples - 1))], shares[math.ceil((1 - tail) * (resamples - 1))]
    return (float(low), float(high)) if math.isfinite(high) else None
