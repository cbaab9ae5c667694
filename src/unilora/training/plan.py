"""The schedule of a run, chosen from what the run is when the user leaves it open.

The methods' recipes hold their learning rates (training/recipes.py), tuned on one budget: 126
optimizer steps (Rotten Tomatoes, 2,000 reviews x 2 epochs at batch 32). Fixed epochs and batch size give a
150-example dataset 10 steps, too few for the small adapters to move, and a 10,000-example one
636. So for classification the schedule is chosen to give every run about that tuned number of
steps: smaller batches for small data first (more steps per pass over the data), then as many
epochs as it takes. Evidence and the sweep over dataset sizes: docs/results.md, "Dataset size".

Distillation (`compress --adapter`) first runs the teacher once over its texts, so a causal-LM
student passes over the texts once instead of finetune's twice (the pass saved pays for the
teacher's), in batches of 2: twice finetune's optimizer steps (SmolLM2 headlines, seed 1: 96.4 %
of the teacher's gain kept, against 94.7 % at batch 4 and 95.3 % with finetune's 2 epochs at 8).
A classifier student trains in length-grouped batches where the padding they save pays for
more epochs than finetune's; elsewhere it passes over its texts one time fewer, in batches small
enough to keep finetune's optimizer steps (plan_run).

Every choice can be overridden (TrainSettings fields / CLI options); what was chosen and why is
recorded in metrics.json under "plan", and `describe_plan` says the whole run in one note before
training: the data and what was held out of it, the schedule, the learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.batching import grouped_share
from ..data.tables import TEST_FRACTION

# about the budget the recipe's rates were tuned on (126 steps)
TARGET_STEPS = 120
MAX_EPOCHS = 40
# evaluations on the test split per run (after the final epoch always)
EVALUATIONS = 4


# causal LM: finetune's schedule, and a distilled student's
LM_BATCH_SIZE, LM_EPOCHS = 8, 2
LM_STUDENT_BATCH_SIZE = 2


def default_batch_size(kind: str, n_train: int, distill: bool = False) -> tuple[int, str]:
    if kind == "causal-lm" and distill:
        return LM_STUDENT_BATCH_SIZE, f"batch size {LM_STUDENT_BATCH_SIZE} (causal LM distillation)"
    if kind == "causal-lm":
        return LM_BATCH_SIZE, f"batch size {LM_BATCH_SIZE} (causal LM)"
    for size, least in ((32, 1000), (16, 300)):
        if n_train >= least:
            return size, f"batch size {size} ({n_train:,} training examples)"
    return 8, f"batch size 8 ({n_train:,} training examples: small batches give more steps)"


def default_epochs(kind: str, steps_per_epoch: int, distill: bool = False) -> tuple[int, str]:
    if kind == "causal-lm" and distill:
        return 1, (f"1 epoch (finetune's {LM_EPOCHS} at batch size {LM_BATCH_SIZE}: the pass saved pays for the "
                   "teacher's pass over the texts)")
    if kind == "causal-lm":
        return LM_EPOCHS, f"{LM_EPOCHS} epochs (causal LM)"
    epochs = min(MAX_EPOCHS, max(1, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return epochs, (f"{epochs} epoch{'s' * (epochs > 1)} = {epochs * steps_per_epoch} optimizer steps "
                    f"(the rates were tuned for about {TARGET_STEPS} steps)")


def plan_run(settings, kind: str, n_train: int, world: int = 1, lengths: list[int] | None = None,
             distill: bool = False) -> dict[str, str]:
    """Fill the fields of `settings` left as None; return {field: why} for each one chosen.
    Distillation (`distill`) passes the examples' `lengths`: where the epochs are left to the plan and
    batches grouped by length save enough padding to pay for more of them, batches are grouped (unless
    group_by_length is False) and the epochs are as many as cost no more than the plan's shuffled
    ones. group_by_length None ends False otherwise. A classifier student that gains no epoch so,
    and whose batch size is left to the plan too, takes the plan's steps in one epoch fewer."""
    chosen = {}
    if settings.batch_size is None:
        settings.batch_size, chosen["batch_size"] = default_batch_size(kind, n_train, distill)
    per_rank = math.ceil(n_train / world)
    steps_per_epoch = math.ceil(per_rank / settings.batch_size)
    if settings.epochs is None:
        settings.epochs, chosen["epochs"] = default_epochs(kind, steps_per_epoch, distill)
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
        elif distill and kind != "causal-lm" and settings.epochs > 1 and "batch_size" in chosen:
            # one pass fewer pays for the teacher's pass; smaller batches keep the plan's steps
            steps = settings.epochs * steps_per_epoch
            settings.epochs -= 1
            settings.batch_size = max(1, per_rank * settings.epochs // steps)
            chosen["epochs"] = (f"{settings.epochs} epochs, one fewer than the plan's, for the teacher's pass over "
                                f"the texts (the plan: {chosen['epochs']})")
            plan_batch = chosen.pop("batch_size")  # printed after the epochs it is fitted to
            chosen["batch_size"] = (f"batch size {settings.batch_size}, the plan's {steps} optimizer steps in those "
                                    f"epochs (the plan: {plan_batch})")
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


def short_run_warning(settings, kind: str, n_train: int, world: int = 1, method: str | None = None) -> str | None:
    """A warning when the user's own epochs / batch size leave a classifier far fewer steps than
    the rates were tuned for: the small adapters are the first to under-fit."""
    steps = settings.epochs * math.ceil(math.ceil(n_train / world) / settings.batch_size)
    if kind == "causal-lm" or steps * 2 > TARGET_STEPS:
        return None
    which = f"a {method} adapter" if method else "a small adapter"
    return (f"{steps} optimizer step{'s' * (steps != 1)}: the default rates were tuned for about {TARGET_STEPS}, "
            f"and {which} may barely train in so few; leave --epochs and --batch-size unset to have them chosen, "
            "or raise them")


@dataclass
class DataCounts:
    """What a run trains and tests on, as the user would count it."""

    train_rows: int  # examples or documents, as read
    test_rows: int
    train_examples: int  # what the batches hold: the rows, or the blocks packed from them
    unit: str = "examples"  # what a row is ("documents" for plain text)
    split_from: str | None = None  # the file the test rows were held out of (no --test-data given)
    block_tokens: int | None = None  # the block length, when rows are packed into blocks
    unscored: bool = False  # causal-LM answers with no metric: the test answers are not generated and scored
    mean_tokens: float | None = None  # tokens of an average training example, once encoded


def describe_plan(data: DataCounts, settings, chosen: dict[str, str], world: int = 1,
                  rates_note: str | None = None) -> str:
    """The run in one line: data and held-out share, batches, epochs, optimizer steps, learning
    rates, and why each value left open was chosen (`chosen`, from plan_run)."""
    parts = [f"{data.train_rows:,} training {data.unit}"]
    if data.block_tokens and data.train_examples != data.train_rows:
        parts[0] += f" packed into {data.train_examples:,} blocks of up to {data.block_tokens} tokens"
    if data.split_from:
        parts.append(f"{data.test_rows:,} held out of '{data.split_from}' for testing (a seeded {TEST_FRACTION:.0%} "
                     "split; --test-data gives your own)")
    else:
        parts.append(f"{data.test_rows:,} test {data.unit}")
    steps = settings.epochs * math.ceil(math.ceil(data.train_examples / world) / settings.batch_size)
    parts.append(f"batch size {settings.batch_size}" + (f" per process x {world}" if world > 1 else "")
                 + f", {settings.epochs} epoch{'s' * (settings.epochs != 1)} = {steps:,} optimizer step{'s' * (steps != 1)}"
                 + (f" of about {settings.batch_size * data.mean_tokens:,.0f} tokens each" if data.mean_tokens else ""))
    rates = ", ".join(f"{name} {rate:.3g}" for name, rate in sorted((settings.group_lrs or {}).items()))
    parts.append(f"learning rate {settings.lr:.3g}" + (f" ({rates})" if rates else ""))
    if data.unscored:
        parts.append("eval loss and perplexity only (no metric: --metric rougeL|accuracy|exact_match also generates "
                     "the test answers and scores them)")
    why = [reason for reason in chosen.values()] + ([rates_note] if rates_note else [])
    text = "plan: " + "; ".join(parts)
    if why:
        text += ". Chosen for this run: " + "; ".join(why)
    return text + " (each can be set: see 'unilora finetune --help')"
