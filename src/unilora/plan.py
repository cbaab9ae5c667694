"""The schedule of a run, chosen from what the run is when the user leaves it open.

`unilora.recipes` holds each method's learning rates, tuned on one budget: 126 optimizer steps
(Rotten Tomatoes, 2,000 reviews x 2 epochs at batch 32). Fixed epochs and batch size give a
150-example dataset 10 steps, too few for the small adapters to move, and a 10,000-example one
636. So for classification the schedule is chosen to give every run about that tuned number of
steps: smaller batches for small data first (more steps per pass over the data), then as many
epochs as it takes. Evidence and the sweep over dataset sizes: docs/results.md, "Dataset size".

Every choice can be overridden (TrainSettings fields / CLI options); what was chosen and why is
printed and recorded in metrics.json under "plan".
"""

from __future__ import annotations

import math

from .batching import grouped_share

# about the budget the recipe's rates were tuned on (126 steps)
TARGET_STEPS = 120
MAX_EPOCHS = 40
# evaluations on the test split per run (after the final epoch always)
EVALUATIONS = 4


def default_batch_size(kind: str, n_train: int) -> tuple[int, str]:
    if kind == "causal-lm":
        return 8, "batch size 8 (causal LM)"
    for size, least in ((32, 1000), (16, 300)):
        if n_train >= least:
            return size, f"batch size {size} ({n_train:,} training examples)"
    return 8, f"batch size 8 ({n_train:,} training examples: small batches give more steps)"


def default_epochs(kind: str, steps_per_epoch: int) -> tuple[int, str]:
    if kind == "causal-lm":
        return 2, "2 epochs (causal LM)"
    epochs = min(MAX_EPOCHS, max(1, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return epochs, (f"{epochs} epoch{'s' * (epochs > 1)} = {epochs * steps_per_epoch} optimizer steps "
                    f"(the rates were tuned for about {TARGET_STEPS} steps)")


def plan_run(settings, kind: str, n_train: int, world: int = 1, lengths: list[int] | None = None) -> dict[str, str]:
    """Fill the fields of `settings` left as None; return {field: why} for each one chosen.
    Distillation passes the examples' `lengths`: where the epochs are left to the plan and batches
    grouped by length save enough padding to pay for more of them, batches are grouped (unless
    group_by_length is False) and the epochs are as many as cost no more than the plan's shuffled
    ones. group_by_length None ends False otherwise."""
    chosen = {}
    if settings.batch_size is None:
        settings.batch_size, chosen["batch_size"] = default_batch_size(kind, n_train)
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / settings.batch_size)
    if settings.epochs is None:
        settings.epochs, chosen["epochs"] = default_epochs(kind, steps_per_epoch)
        share = grouped_share(lengths, settings.batch_size, settings.seed) \
            if lengths and settings.group_by_length is not False else 1.0
        epochs = math.floor(settings.epochs / share)
        if epochs > settings.epochs:  # the padding saved pays for more passes over the data
            if settings.group_by_length is None:
                chosen["group_by_length"] = f"batches grouped by length ({share:.2f}x the padded tokens of shuffled ones)"
            settings.group_by_length = True
            chosen["epochs"] = (f"{epochs} epochs of grouped batches, costing no more than {settings.epochs} shuffled "
                                f"ones (the plan: {chosen['epochs']})")
            settings.epochs = epochs
    if settings.group_by_length is None:
        settings.group_by_length = False
    if settings.max_grad_norm is None:
        # Clipping at 1.0 cost VB-LoRA 1.4 and 1.7 points at the tuned budget (seeds 0 and 4) and did
        # not keep bank 4e-2 from diverging; Adam's steps hardly change with the gradient's scale.
        settings.max_grad_norm = 0.0
    if settings.eval_every is None:
        settings.eval_every = max(1, math.ceil(settings.epochs / EVALUATIONS))
        if settings.eval_every > 1:
            chosen["eval_every"] = f"evaluated every {settings.eval_every} epochs and after the last"
    return chosen


def short_run_warning(settings, kind: str, n_train: int, world: int = 1) -> str | None:
    """A warning when the user's own epochs / batch size leave a classifier far fewer steps than
    the rates were tuned for: the small adapters are the first to under-fit."""
    steps = settings.epochs * math.ceil(math.ceil(n_train / world) / settings.batch_size)
    if kind == "causal-lm" or steps * 2 > TARGET_STEPS:
        return None
    return (f"{steps} optimizer step{'s' * (steps != 1)}: the default rates were tuned for about {TARGET_STEPS}, "
            "and small adapters (Uni-LoRA, VB-LoRA) may barely train; leave --epochs and --batch-size unset to "
            "have them chosen, or raise them")
