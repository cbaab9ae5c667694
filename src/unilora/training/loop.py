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
from .recipes import fitted_group_lrs


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


def fit_rates_to(model: AdaptedModel, settings: TrainSettings) -> str | None:
    """With `settings.fit_rates`, the recipe's θ rate scaled to the adapted model (in place); the
    note saying what changed, if anything did."""
    if not settings.fit_rates:
        return None
    config = model.adapter_config
    settings.group_lrs, said = fitted_group_lrs(config.method, settings.group_lrs, model.projection.layout.D,
                                                getattr(config, "theta_dim", None))
    return said


def train(model: torch.nn.Module, task: Task, settings: TrainSettings, param_groups: list[dict]) -> list[dict]:
    """The loop: AdamW over `param_groups`, linear warm-up then linear decay, DDP when launched by
    torchrun, evaluation after every epoch (on rank 0). Returns the history of evaluations.
    Any model that returns `.logits` / `.loss` trains here (the results scripts train PEFT's too)."""
    rank, world = distributed()
    trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    n_train = task.train_size()
    plan_run(settings, task.kind, n_train, world)  # callers other than finetune may leave fields open
    optimizer = torch.optim.AdamW(param_groups, lr=settings.lr)
    parameters = [p for group in param_groups for p in group["params"]]
    per_rank = math.ceil(n_train / world)
    steps_per_epoch = math.ceil(per_rank / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    history = []
    stepping = 0.0  # seconds in optimizer steps, evaluation excluded: the cost of the adapter itself
    for epoch in range(1, settings.epochs + 1):
        epoch_started = time.time()
        task.train_mode(model)
        task.start_epoch(epoch)
        order = list(range(n_train))
        random.Random(settings.seed * 7919 + epoch).shuffle(order)
        order = order[rank::world][:per_rank]
        if settings.group_by_length:
            order = length_grouped(order, task.train_length, settings.batch_size, random.Random(settings.seed + epoch))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{settings.epochs}", disable=not settings.progress or rank)
        running, norms = 0.0, []
        for step in bar:
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            if not idx:
                break
            loss = task.loss(trainer, task.batch(idx))
            loss.backward()
            # the norm before clipping is recorded, so a run that did not learn shows why
            norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm or math.inf).item()
            norms.append(norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
        stepping += time.time() - epoch_started
        last = epoch == settings.epochs
        if rank == 0 and (last or epoch % settings.eval_every == 0):
            result = task.evaluate(model, final=last)
            history.append({"epoch": epoch, **result, "train_loss": running,
                            "grad_norm_median": statistics.median(norms) if norms else 0.0,
                            "grad_norm_max": max(norms, default=0.0), "train_seconds": round(stepping, 1)})
            print(f"epoch {epoch}: {task.summary(result)}, train loss {running:.4f}", flush=True)
        elif rank == 0:
            print(f"epoch {epoch}: train loss {running:.4f}", flush=True)
        if world > 1:
            dist.barrier()
    return history
