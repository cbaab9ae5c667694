"""A run: what `unilora finetune` and `unilora evaluate` do, as library functions. `finetune` trains
an adapter through the shared loop (loop.train) and writes the run folder, OUT/adapter and
OUT/metrics.json, atomically; the task comes from the data (classification or causal LM)."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.tasks import task_kind
from ..data.lm import LMDataset
from ..engine.model import AdaptedModel, get_model
from ..store.io import AdapterFile, is_adapter_dir
from ..store.validation import read_json_object
from ..store.writing import check_writable, write_json_atomic, write_output_dir
from .causal_lm import CausalLMTask, evaluate_lm_adapter
from .classification import ClassificationTask, evaluate_classifier
from .loop import Task, TrainSettings, distributed, fit_rates_to, train
from .plan import plan_run, short_run_warning
from .records import read_task_adapter


def _is_our_metrics(path: Path) -> bool:
    try:
        return read_json_object(path, "metrics").get("writer") == "unilora"
    except (UniLoraError, OSError):
        return False


# history entries that describe an epoch rather than the run's result
PER_EPOCH = ("epoch", "train_loss", "grad_norm_median", "grad_norm_max")

# what `finetune` writes into OUT: replaced only as a whole, and only when we wrote it
RUN_FILES = {"adapter": is_adapter_dir, "metrics.json": _is_our_metrics}


def finetune(model_name: str, data, adapter: AdapterConfig, settings: TrainSettings,
             out_dir: str | Path, overwrite: bool = False) -> dict:
    """Train an adapter on `data` (a classification TextDataset or a causal-LM LMDataset); write
    OUT/adapter and OUT/metrics.json together, as one folder put in place at the end (OUT is
    checked before training). Returns the metrics."""
    rank, world = distributed()
    if rank == 0:
        check_writable(Path(out_dir), RUN_FILES, overwrite, "run")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    task = task_for(data)
    base = task.build(model_name, settings)
    model: AdaptedModel = get_model(base, adapter)
    n_train = task.train_size()
    plan = plan_run(settings, task.kind, n_train, world)
    if plan and rank == 0:
        print(f"note: {'; '.join(plan.values())} (each can be set: see 'unilora finetune --help')", file=sys.stderr)
    short = short_run_warning(settings, task.kind, n_train, world)
    if short and rank == 0:
        print(f"warning: {short}", file=sys.stderr)
    note = fit_rates_to(model, settings)
    if note and rank == 0:
        print(f"note: {note}", file=sys.stderr)

    started = time.time()
    history = train(model, task, settings, model.parameter_groups(settings.lr, settings.group_lrs,
                                                                 settings.weight_decay))
    metrics = {}
    if rank == 0:
        record = {"task": task.kind, "model": model_name, "dataset": task.data_name, **task.record()}
        metrics = {
            "writer": "unilora",
            "task": task.kind,
            "method": adapter.method,
            "dataset": task.data_name,
            "model": model_name,
            **{k: v for k, v in history[-1].items() if k not in PER_EPOCH},
            "history": history,
            "stored_params": model.stored_param_count(),
            "adapter_bytes": model.stored_bytes(),
            "head_params": sum(p.numel() for p in model.head_parameters().values()),
            "trainable_params": model.trainable_parameter_count(),
            "train_examples": n_train,
            "test_examples": task.test_size(),
            "seconds": round(time.time() - started, 1),
            "world_size": world,
            "adapter": model.adapter_config.to_dict(),  # with any value chosen from the model (VB-LoRA b)
            "settings": asdict(settings),
            "plan": plan,  # the settings chosen from the run, and why
        }

        def write(staging: Path) -> None:
            model.save_pretrained(staging / "adapter", task=record)
            write_json_atomic(staging / "metrics.json", metrics)

        write_output_dir(out_dir, write, RUN_FILES, overwrite, what="run", last=("metrics.json",))
    if world > 1:
        dist.barrier()
    return metrics


def task_for(data) -> Task:
    """The task that trains on `data`: a causal LM's for LMDataset, else a classifier's."""
    return CausalLMTask(data) if isinstance(data, LMDataset) else ClassificationTask(data)


def evaluate_adapter(adapter: str | Path | AdapterFile, data=None, model_name: str | None = None,
                     batch_size: int = 128, limits: tuple[int | None, int | None] = (None, None),
                     max_new_tokens: int | None = None) -> dict:
    """Scores of a saved adapter on `data`'s test split; without data, on the data it was trained on
    (cut to `limits` = (train, test) sizes)."""
    adapter, task = read_task_adapter(adapter)
    if task_kind(task) == "causal-lm":
        return evaluate_lm_adapter(adapter, data, model_name, batch_size, limits, max_new_tokens)
    return evaluate_classifier(adapter, data, model_name, batch_size, limits)
