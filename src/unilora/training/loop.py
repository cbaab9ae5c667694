"""The training loop shared by every task (single process or DDP via torchrun).

A task (classification.ClassificationTask, causal_lm.CausalLMTask, distill's tasks) says what
differs: the model it builds, its examples, how a batch is made and scored, how a model is
evaluated and what the adapter records. The loop owns the rest: the optimizer with per-group
rates, the warm-up / linear-decay schedule, DDP, the progress bar and the history. A run folder
around it (seeds, the adapted model, metrics.json) is runs.finetune's.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.errors import UniLoraError
from ..core.notes import note
from ..data.batching import length_grouped
from ..engine.model import AdaptedModel
from .plan import plan_run
from .recipes import CLI_RATE_OVERRIDE, fitted_group_lrs


@dataclass
class TrainSettings:
    # None: chosen from the run (the task and the number of training examples) by plan.plan_run
    epochs: int | None = None
    batch_size: int | None = None
    max_length: int = 64
    lr: float = 1e-3  # for any group without its own rate
    group_lrs: dict = field(default_factory=dict)
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = None  # 0: no clipping
    eval_every: int | None = None  # epochs between evaluations; the last epoch is always evaluated
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 128
    progress: bool = True
    fit_rates: bool = False  # scale the recipe's θ rate to the model (recipes.fitted_group_lrs)
    packing: bool = True  # causal LM, plain text: concatenate documents into full-length blocks
    max_new_tokens: int | None = None  # causal LM metric: tokens generated per answer (None: from the answers)
    group_by_length: bool | None = False  # batches of texts of similar length (batching.py); None: plan.plan_run
    quantize: str | None = None  # causal LM: the base's linear layers quantized (models/quantization.py)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size", "eval_every"):
            value = getattr(self, name)
            if value is None and name in ("epochs", "batch_size", "eval_every"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UniLoraError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0.0 <= self.warmup_ratio < 1.0:
            raise UniLoraError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float))
                                 or not math.isfinite(norm) or norm < 0):
            raise UniLoraError(f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {norm!r}")


class Task:
    """What one kind of fine-tuning supplies to the shared loop."""

    kind: str  # recorded in the adapter: "seq-cls" or "causal-lm"

    def __init__(self, dataset):
        self.dataset = dataset
        self.data_name = dataset.name

    def build(self, model_name: str, settings: TrainSettings) -> torch.nn.Module:
        """Load the tokenizer and the base model, encode the data; return the base model."""
        raise NotImplementedError

    train_examples: list  # encoded by `build`, indexed by `batch`
    test_examples: list

    def train_size(self) -> int:
        return len(self.train_examples)

    def test_size(self) -> int:
        return len(self.test_examples)

    def train_length(self, index: int) -> int:
        """Tokens of a training example (what a batch is padded to)."""
        example = self.train_examples[index]
        return len(getattr(example, "input_ids", example))

    def batch(self, indices: list[int]) -> dict:
        """The model inputs, labels included, for these training examples."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of a batch (`model` may be the DDP wrapper)."""
        return model(**batch).loss

    def loss_terms(self, indices: list[int]) -> int:
        """How many terms these examples add to a batch's mean loss (a batch taken in parts weighs
        each part by its terms): one per example, unless the task's loss is a mean over tokens."""
        return len(indices)

    def train_mode(self, model: torch.nn.Module) -> None:
        """Put the model in the mode its training forwards run in (before every epoch)."""
        model.train()

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch's first batch (a streamed task starts its stream's new order here)."""

    def evaluate(self, model: torch.nn.Module, final: bool) -> dict:
        """Held-out metrics after an epoch; `final` adds the costly ones (generation)."""
        raise NotImplementedError

    def summary(self, result: dict) -> str:
        raise NotImplementedError

    def record(self) -> dict:
        """What the adapter records about the task, so `evaluate` and `generate` need no options."""
        raise NotImplementedError


def distributed() -> tuple[int, int]:
    """(rank, world size): this process's place under torchrun (gloo joined on first use), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def model_max_length(tokenizer, model) -> int:
    """The longest input the model accepts: the tokenizer's limit, else the position table's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return int(getattr(model.config, "max_position_embeddings", 512))


def fitted_max_length(requested: int, tokenizer, model) -> int:
    limit = model_max_length(tokenizer, model)
    if requested > limit:
        note(f"--max-length {requested} is above this model's limit; using {limit}")
        return limit
    return requested


def fit_rates_to(model: AdaptedModel, settings: TrainSettings, override: str = CLI_RATE_OVERRIDE) -> str | None:
    """With `settings.fit_rates`, the recipe's θ rate scaled to the adapted model (in place); the
    note saying what changed, if anything did (ending with `override`: how to set another rate)."""
    if not settings.fit_rates:
        return None
    config = model.adapter_config
    settings.group_lrs, said = fitted_group_lrs(config.method, settings.group_lrs, model.projection.layout.D,
                                                getattr(config, "theta_dim", None), override)
    return said


SAY_TIME_FROM_S = 60.0  # a run expected to take longer says so after its first step
LONG_RUN_S = 15 * 60.0  # ... and, past this, what shortens it


def peak_memory_bytes() -> int:
    """The process's peak resident memory (and the GPU's peak allocation, when one is used)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak += torch.cuda.max_memory_allocated()
    return peak


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def time_expectation(first_step_s: float, total_steps: int, peak_bytes: int | None) -> str | None:
    """After the first optimizer step: the run's expected training time and the memory it holds, when
    the run is long enough to be worth saying; past LONG_RUN_S, what shortens it."""
    expected = first_step_s * total_steps
    if expected < SAY_TIME_FROM_S:
        return None
    text = (f"the first step took {first_step_s:.1f} s: about {_duration(expected)} for all {total_steps:,} steps "
            "(evaluations not counted)")
    if peak_bytes:
        text += f"; peak memory so far {peak_bytes / 2**30:.1f} GiB"
    if expected >= LONG_RUN_S:
        text += (". To shorten it: --max-length (fewer tokens per example), --train-limit N (fewer examples) or "
                 "fewer --epochs (in Python, gradient checkpointing lowers the memory, at some cost in time)")
    return text


class TrainingRun:
    """The loop's state, advanced a piece at a time: an epoch's order, one optimizer step's batch
    (taken whole or in parts whose gradients accumulate), the step, the epoch's evaluation.
    `train` drives it to the end at once; the server's co-training (serve/cotraining.py) advances
    it a part at a time between decoding turns. Both take the same steps in the same order, so a
    run is the same whichever drives it."""

    def __init__(self, model: torch.nn.Module, task: Task, settings: TrainSettings, param_groups: list[dict],
                 trainer: torch.nn.Module | None = None, rank: int = 0, world: int = 1):
        self.model, self.task, self.settings = model, task, settings
        self.trainer = trainer or model  # what the loss runs through (the DDP wrapper under torchrun)
        self.rank, self.world = rank, world
        self.n_train = task.train_size()
        plan_run(settings, task.kind, self.n_train, world)  # callers other than finetune may leave fields open
        self.optimizer = torch.optim.AdamW(param_groups, lr=settings.lr)
        self.parameters = [p for group in param_groups for p in group["params"]]
        self.per_rank = math.ceil(self.n_train / world)
        self.steps_per_epoch = math.ceil(self.per_rank / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        warmup = max(1, int(self.total_steps * settings.warmup_ratio))
        total = self.total_steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
        )
        self.history: list[dict] = []
        self.stepping = 0.0  # seconds in optimizer steps, evaluation excluded: the cost of the adapter itself
        self.epoch, self.step = 1, 0  # the next step to take
        self.order: list[int] | None = None  # this epoch's order of the training examples
        self.running, self.norms = 0.0, []
        self.step_loss = 0.0  # the loss of the step in progress, summed over its parts
        self.report = lambda line: print(line, flush=True)  # where the epochs' lines go

    @property
    def finished(self) -> bool:
        return self.epoch > self.settings.epochs

    @property
    def steps_done(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.step

    def start_epoch(self) -> None:
        self.task.train_mode(self.model)
        self.task.start_epoch(self.epoch)
        order = list(range(self.n_train))
        random.Random(self.settings.seed * 7919 + self.epoch).shuffle(order)
        order = order[self.rank :: self.world][: self.per_rank]
        if self.settings.group_by_length:
            order = length_grouped(order, self.task.train_length, self.settings.batch_size,
                                   random.Random(self.settings.seed + self.epoch))
        self.order = order
        self.running, self.norms = 0.0, []

    def step_indices(self) -> list[int]:
        """The training examples of the step in progress (empty once the epoch's order ran out)."""
        size = self.settings.batch_size
        return self.order[self.step * size : (self.step + 1) * size]

    @property
    def epoch_over(self) -> bool:
        return self.step >= self.steps_per_epoch or not self.step_indices()

    def accumulate(self, indices: list[int], share: float = 1.0) -> None:
        """Forward and backward on part of the step's batch; `share` is the part's weight in the
        batch's loss (its share of the loss terms), so the parts' gradients add up to the batch's."""
        started = time.time()
        loss = self.task.loss(self.trainer, self.task.batch(indices))
        (loss if share == 1.0 else loss * share).backward()
        self.step_loss += loss.item() * share
        self.stepping += time.time() - started

    def finish_step(self) -> float:
        """The optimizer step on the accumulated gradients; returns the step's loss."""
        started = time.time()
        # the norm before clipping is recorded, so a run that did not learn shows why
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm or math.inf).item()
        self.norms.append(norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, self.step_loss = self.step_loss, 0.0
        self.running = 0.9 * self.running + 0.1 * loss if self.step else loss
        self.step += 1
        self.stepping += time.time() - started
        return loss

    def drop_partial_step(self) -> None:
        """Forget the gradients of a step left half-done (it is taken again from its start)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step_loss = 0.0

    def end_epoch(self, evaluate: bool = True) -> dict | None:
        """After an epoch's last step: its evaluation when due (rank 0), then the next epoch. Returns
        the history entry, if one was made."""
        settings, epoch = self.settings, self.epoch
        last = epoch == settings.epochs
        entry = None
        if evaluate and self.rank == 0 and (last or epoch % settings.eval_every == 0):
            result = self.task.evaluate(self.model, final=last)
            entry = {"epoch": epoch, **result, "train_loss": self.running,
                     "grad_norm_median": statistics.median(self.norms) if self.norms else 0.0,
                     "grad_norm_max": max(self.norms, default=0.0), "train_seconds": round(self.stepping, 1)}
            self.history.append(entry)
            self.report(f"epoch {epoch}: {self.task.summary(result)}, train loss {self.running:.4f}")
        elif self.rank == 0:
            self.report(f"epoch {epoch}: train loss {self.running:.4f}")
        self.epoch, self.step, self.order = epoch + 1, 0, None
        return entry

    # --- resuming: the state between two steps ------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "epoch": self.epoch, "step": self.step, "running": self.running, "norms": list(self.norms),
                "stepping": self.stepping}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.stepping = float(state["stepping"])
        if not self.finished:
            self.start_epoch()  # the order is the epoch's seeded one; the running loss is the saved one
        self.running, self.norms = float(state["running"]), [float(n) for n in state["norms"]]


def train(model: torch.nn.Module, task: Task, settings: TrainSettings, param_groups: list[dict]) -> list[dict]:
    """The loop: AdamW over `param_groups`, linear warm-up then linear decay, DDP when launched by
    torchrun, evaluation after every epoch (on rank 0). Returns the history of evaluations.
    Any model that returns `.logits` / `.loss` trains here (the results scripts train PEFT's too)."""
    rank, world = distributed()
    trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = TrainingRun(model, task, settings, param_groups, trainer, rank, world)
    while not run.finished:
        run.start_epoch()
        bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {run.epoch}/{settings.epochs}",
                   disable=not settings.progress or rank)
        for _ in bar:
            if run.epoch_over:
                break
            started = time.perf_counter()
            run.accumulate(run.step_indices())
            run.finish_step()
            bar.set_postfix(loss=f"{run.running:.4f}")
            if run.steps_done == 1 and rank == 0:
                said = time_expectation(time.perf_counter() - started, run.total_steps, peak_memory_bytes())
                if said:
                    note(said)
        run.end_epoch()
        if world > 1:
            dist.barrier()
    return run.history
