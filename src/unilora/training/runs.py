"""A run: what `unilora finetune` and `unilora evaluate` do, as library functions, so that a Python
caller gets what the command line gets.

`run_finetune` takes the command's options: it chooses the task (from the data and the model),
the adapter config (the method's recipe) and the rates, then `finetune` trains through the shared
loop (loop.train) and writes the run folder, OUT/adapter and OUT/metrics.json, atomically.
`run_evaluate` scores a saved adapter on the data it records or on other data.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.notes import note
from ..core.tasks import task_kind
from ..data.lm import LMDataset, is_lm_data
from ..data.sources import DataSpec
from ..data.text import TextDataset, small_classes
from ..engine.model import AdaptedModel, get_model
from ..methods import recipe_config
from ..models.backbones import EMBEDDED_MODEL, is_causal_lm, is_embedded
from ..models.embedded_llm import EMBEDDED_LLM
from ..models.quantization import check_quantization
from ..store.io import AdapterFile, is_adapter_dir
from ..store.validation import read_json_object
from ..store.writing import check_writable, write_json_atomic, write_output_dir
from .causal_lm import CausalLMTask, evaluate_lm_adapter
from .classification import ClassificationTask, evaluate_classifier
from .loop import Task, TrainSettings, distributed, fit_rates_to, train
from .plan import DataCounts, describe_plan, plan_run, short_run_warning
from .recipes import finetune_group_lrs
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
    rates_note = fit_rates_to(model, settings)
    if rank == 0:
        note(describe_plan(data_counts(data, task), settings, plan, world, rates_note))
    short = short_run_warning(settings, task.kind, n_train, world, model.adapter_config.method)
    if short and rank == 0:
        print(f"warning: {short}", file=sys.stderr)

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
            "stored_note": model.projection.stored_note,
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


def data_counts(data, task: Task) -> DataCounts:
    """What `describe_plan` says of the data: rows read, held out, and what the batches hold."""
    source = data.source or {}
    held_out = not source.get("test_data") and not source.get("test_split")  # no test file, no test split of its own
    split_from = (Path(source["data"]).name if source.get("data") else data.name) if held_out else None
    n = task.train_size()
    sample = range(0, n, max(1, n // 1000))  # a streamed set is counted, not read: its lengths are max_length
    mean_tokens = sum(task.train_length(i) for i in sample) / max(1, len(sample)) if n and task_lengths_known(task) \
        else None
    if isinstance(data, LMDataset):
        unit = "documents" if data.kind == "text" else "examples"
        unscored = data.kind != "text" and not data.metric
        return DataCounts(len(data.train), len(data.test), n, unit, split_from, task.max_length, unscored, mean_tokens)
    return DataCounts(len(data.train_texts), len(data.test_texts), n, "texts", split_from, mean_tokens=mean_tokens)


def task_lengths_known(task: Task) -> bool:
    """Whether the task's training examples are encoded up front (a streamed set's are not)."""
    return getattr(task, "stream", None) is None


def task_for(data) -> Task:
    """The task that trains on `data`: a causal LM's for LMDataset, else a classifier's."""
    return CausalLMTask(data) if isinstance(data, LMDataset) else ClassificationTask(data)


def evaluate_adapter(adapter: str | Path | AdapterFile, data=None, model_name: str | None = None,
                     batch_size: int = 128, limits: tuple[int | None, int | None] = (None, None),
                     max_new_tokens: int | None = None, quantize: str | None = None) -> dict:
    """Scores of a saved adapter on `data`'s test split; without data, on the data it was trained on
    (cut to `limits` = (train, test) sizes)."""
    adapter, task = read_task_adapter(adapter)
    if task_kind(task) == "causal-lm":
        return evaluate_lm_adapter(adapter, data, model_name, batch_size, limits, max_new_tokens, quantize)
    if quantize not in (None, "none"):
        raise UniLoraError("--quantize is for causal-LM adapters; this one is a classifier's")
    return evaluate_classifier(adapter, data, model_name, batch_size, limits)


# per task: (default model, max length)
TASK_DEFAULTS = {"seq-cls": (EMBEDDED_MODEL, 64), "causal-lm": (EMBEDDED_LLM, 256)}


def resolve_task(task: str | None, data, model: str | None, text_column: str = "text",
                 spec: DataSpec | None = None) -> tuple[str, str, str]:
    """(task, data, model): `task` if given, else what the data and the model say (data.lm.is_lm_data;
    an LLM with labelled data is ambiguous); the data and the model default per task."""
    causal_model = model is not None and is_causal_lm(model)
    hf = dict(split=spec.split, data_config=spec.data_config, streaming=spec.streaming) if spec else {}
    if task is None:
        if data is not None and is_lm_data(data, text_column, **hf):
            task = "causal-lm"
        elif causal_model:
            raise UniLoraError(
                f"'{model}' is a causal language model and "
                + ("the data has labels" if data else "no --data was given")
                + ": pass --task seq-cls to train a classifier on it, or --task causal-lm with text, "
                "prompt/completion or chat data")
        else:
            task = "seq-cls"
    if task == "causal-lm" and model is not None and not causal_model:
        raise UniLoraError(f"'{model}' is not a causal language model (its config names no *ForCausalLM "
                           "architecture); --task causal-lm needs one")
    if data is None:
        if task == "causal-lm":
            raise UniLoraError("--task causal-lm needs --data (bbc_headlines, rotten_tomatoes_instruct, a .txt "
                               "file, or JSONL with text, prompt/completion or chat messages)")
        data = "rotten_tomatoes"
    return task, data, model or TASK_DEFAULTS[task][0]


@dataclass
class FinetuneRun:
    out: Path  # the run folder: OUT/adapter and OUT/metrics.json
    task: str
    dataset: TextDataset | LMDataset
    metrics: dict  # empty on the ranks other than 0 under torchrun


def run_finetune(data: DataSpec | None = None, *, task: str | None = None, model: str | None = None,
                 method: str = "unilora", targets="all-linear", adapter: dict | None = None, seed: int = 0,
                 lr: float | None = None, head_lr: float | None = None, group_lrs: dict[str, float] | None = None,
                 max_length: int | None = None, out: str | Path | None = None, overwrite: bool = False,
                 **schedule) -> FinetuneRun:
    """`unilora finetune`: an adapter of `method` trained on `data` (a classifier or a causal LM, as
    `resolve_task` decides), written to `out` (default runs/METHOD-DATA-seedN), which is checked
    before anything is read or loaded.

    `adapter`: AdapterConfig fields over the method's recipe (its "seed" defaults to `seed`); `lr`
    sets every adapter group's rate, `head_lr` the classifier head's, `group_lrs` single groups (the
    rest are the recipe's, Uni-LoRA's θ rate fitted to the model unless set); `schedule`:
    TrainSettings fields (epochs, batch_size, warmup_ratio, max_grad_norm, eval_every, packing,
    max_new_tokens, group_by_length, progress, quantize), those left out chosen from the run (plan.py)."""
    data = data or DataSpec()
    out = Path(out or f"runs/{method}-{data.name}-seed{seed}")
    check_writable(out, RUN_FILES, overwrite, "run")  # before any data is read or model loaded
    task, spec, model = resolve_task(task, data.data, model, data.text_column, data)
    classify = task == "seq-cls"
    if classify and schedule.get("quantize"):
        raise UniLoraError("--quantize is for causal LMs (QLoRA's setup); a classifier's encoder trains on its "
                           "weights as they are")
    schedule["quantize"] = check_quantization(schedule.get("quantize"))
    rates, fit_rates = finetune_group_lrs(method, classify, lr, head_lr, group_lrs)
    config = recipe_config(method, targets, modules_to_save=["classifier"] if classify else [], run_seed=seed,
                           tuned_model=is_embedded(model), **(adapter or {}))
    dataset = replace(data, data=spec).load(task)  # fails early, before any training, on bad data options
    small = small_classes(dataset) if classify else []
    if small:
        print(f"warning: few training examples for {', '.join(small[:5])}: under 10 per class, expect a weak or "
              "majority-class model", file=sys.stderr)
    settings = TrainSettings(max_length=max_length or TASK_DEFAULTS[task][1], lr=lr or 1e-3, group_lrs=rates, seed=seed,
                             fit_rates=fit_rates, **schedule)
    metrics = finetune(model, dataset, config, settings, out, overwrite=overwrite)
    return FinetuneRun(out, task, dataset, metrics)


def run_evaluate(adapter: str | Path | AdapterFile, data: DataSpec | None = None, model: str | None = None,
                 max_new_tokens: int | None = None, quantize: str | None = None) -> dict:
    """`unilora evaluate`: a saved adapter's scores on `data` (by default the data it records, cut to
    the spec's limits); notes about the run (labels matched by name) under "notes"."""
    data = data or DataSpec()
    adapter, task = read_task_adapter(adapter)
    if data.data is None and data.test_data:
        # one new file to score: read as both splits (no held-out cut), only its test split is used
        data = replace(data, data=data.test_data)
    dataset = data.load(task_kind(task)) if data.data is not None else None
    if dataset is None and data.metric:
        raise UniLoraError("--metric goes with --data; without --data the recorded data's metric is used")
    return evaluate_adapter(adapter, dataset, model, limits=(data.train_limit, data.test_limit),
                            max_new_tokens=max_new_tokens, quantize=quantize)
