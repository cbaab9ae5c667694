"""Fine-tuning and evaluation loop for text classification (single process or DDP via torchrun)."""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .backbones import SequenceClassifier, load_backbone
from .config import AdapterConfig
from .data import BUILTIN_DATASETS, TextDataset, load_dataset
from .errors import UniLoraError
from .io import is_adapter_dir, read_adapter
from .model import AdaptedModel, get_model
from .validation import read_json_object
from .writing import check_writable, write_json_atomic, write_output_dir


def _is_our_metrics(path: Path) -> bool:
    try:
        return read_json_object(path, "metrics").get("writer") == "unilora"
    except (UniLoraError, OSError):
        return False


# what `finetune` writes into OUT: replaced only as a whole, and only when we wrote it
RUN_FILES = {"adapter": is_adapter_dir, "metrics.json": _is_our_metrics}


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3  # for any group without its own rate
    group_lrs: dict = field(default_factory=dict)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 128
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UniLoraError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UniLoraError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(tokenizer, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({"input_ids": sequences}, return_tensors="pt")


@torch.no_grad()
def accuracy(model, tokenizer, encoded: list[list[int]], labels: list[int], batch_size: int) -> float:
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate(tokenizer, [encoded[i] for i in idx])
        predicted = model(**batch).logits.argmax(-1)
        correct += int((predicted == torch.tensor([labels[i] for i in idx])).sum())
    return correct / max(1, len(labels))


def build_classifier(model_name: str, num_labels: int, seed: int):
    tokenizer, encoder = load_backbone(model_name)
    return tokenizer, SequenceClassifier(encoder, num_labels, seed=seed)


def model_max_length(tokenizer, encoder) -> int:
    """The longest input the model accepts: the tokenizer's limit, else the position table's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return int(getattr(encoder.config, "max_position_embeddings", 512))


def fitted_max_length(requested: int, tokenizer, encoder) -> int:
    limit = model_max_length(tokenizer, encoder)
    if requested > limit:
        print(f"note: --max-length {requested} is above this model's limit; using {limit}", file=sys.stderr)
        return limit
    return requested


def finetune(model_name: str, dataset: TextDataset, adapter: AdapterConfig, settings: TrainSettings,
             out_dir: str | Path, overwrite: bool = False) -> dict:
    """Train an adapter; write OUT/adapter (the adapter) and OUT/metrics.json together, as one
    folder put in place at the end (OUT is checked before training). Returns the metrics."""
    rank, world = _distributed()
    if rank == 0:
        check_writable(Path(out_dir), RUN_FILES, overwrite, "run")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    tokenizer, classifier = build_classifier(model_name, len(dataset.label_names), settings.seed)
    model: AdaptedModel = get_model(classifier, adapter)
    max_length = fitted_max_length(settings.max_length, tokenizer, classifier.encoder)
    train_ids = encode(tokenizer, dataset.train_texts, max_length)
    test_ids = encode(tokenizer, dataset.test_texts, max_length)

    trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(
        model.parameter_groups(settings.lr, settings.group_lrs, settings.weight_decay), lr=settings.lr
    )
    per_rank = math.ceil(len(train_ids) / world)
    steps_per_epoch = math.ceil(per_rank / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    history, started = [], time.time()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = list(range(len(train_ids)))
        random.Random(settings.seed * 7919 + epoch).shuffle(order)
        order = order[rank::world][:per_rank]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{settings.epochs}", disable=not settings.progress or rank)
        running = 0.0
        for step in bar:
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            if not idx:
                break
            batch = collate(tokenizer, [train_ids[i] for i in idx])
            batch["labels"] = torch.tensor([dataset.train_labels[i] for i in idx])
            loss = trainer(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
        if rank == 0:
            acc = accuracy(model, tokenizer, test_ids, dataset.test_labels, settings.eval_batch_size)
            history.append({"epoch": epoch, "test_accuracy": acc, "train_loss": running})
            print(f"epoch {epoch}: test accuracy {acc:.4f}, train loss {running:.4f}", flush=True)
        if world > 1:
            dist.barrier()
    metrics = {}
    if rank == 0:
        task = {"model": model_name, "dataset": dataset.name, "label_names": dataset.label_names,
                "max_length": max_length, "data": dataset.source}
        metrics = {
            "writer": "unilora",
            "method": adapter.method,
            "dataset": dataset.name,
            "model": model_name,
            "test_accuracy": history[-1]["test_accuracy"],
            "history": history,
            "stored_params": model.stored_param_count(),
            "adapter_bytes": model.stored_bytes(),
            "head_params": sum(p.numel() for p in model.head_parameters().values()),
            "trainable_params": model.trainable_parameter_count(),
            "train_examples": len(train_ids),
            "test_examples": len(test_ids),
            "seconds": round(time.time() - started, 1),
            "world_size": world,
            "adapter": model.adapter_config.to_dict(),  # with any value chosen from the model (VB-LoRA b)
            "settings": asdict(settings),
        }

        def write(staging: Path) -> None:
            model.save_pretrained(staging / "adapter", task=task)
            write_json_atomic(staging / "metrics.json", metrics)

        write_output_dir(out_dir, write, RUN_FILES, overwrite, what="run", last=("metrics.json",))
    if world > 1:
        dist.barrier()
    return metrics


def dataset_of(task: dict, adapter_dir) -> TextDataset:
    """The data an adapter was trained on, as recorded by `finetune`."""
    source = task.get("data") or {}
    spec = source.get("data")
    if not spec or (spec not in BUILTIN_DATASETS and not Path(spec).is_file()):
        raise UniLoraError(f"'{adapter_dir}' does not record data that is available here"
                           f"{f' ({spec})' if spec else ''}; pass --data")
    return load_dataset(spec, source.get("text_column", "text"), source.get("label_column", "label"),
                        source.get("test_data"), seed=0)


def label_mapping(adapter_labels: list[str], data_labels: list[str]) -> list[int]:
    """For each data label id, the adapter's id of the same name; refuses names it does not know."""
    unknown = [name for name in data_labels if name not in adapter_labels]
    if unknown:
        raise UniLoraError(
            f"the data has labels {unknown[:5]} that this adapter does not know (it predicts {adapter_labels}); "
            "evaluate on data labelled with the same names"
        )
    return [adapter_labels.index(name) for name in data_labels]


def evaluate_adapter(adapter_dir: str | Path, dataset: TextDataset | None, model_name: str | None = None,
                     batch_size: int = 128, limits: tuple[int | None, int | None] = (None, None)) -> dict:
    """Accuracy of a saved classification adapter on the dataset's test split; without a dataset,
    on the data it was trained on (cut to `limits` = (train, test) sizes). Labels are matched by name."""
    adapter = read_adapter(adapter_dir)
    task = adapter.task
    if not task:
        raise UniLoraError(f"'{adapter_dir}' was not saved by `unilora finetune` (no task info); evaluate it in Python")
    if dataset is None:
        dataset = dataset_of(task, adapter_dir).limited(*limits, seed=0)
    mapping = label_mapping(task["label_names"], dataset.label_names)
    notes = []
    if mapping != list(range(len(mapping))):
        pairs = ", ".join(f"{name}->{task['label_names'][i]}" for name, i in zip(dataset.label_names, mapping))
        notes.append(f"labels matched by name ({pairs})")
    tokenizer, classifier = build_classifier(model_name or task["model"], len(task["label_names"]), 0)
    model = AdaptedModel.from_pretrained(classifier, adapter)
    encoded = encode(tokenizer, dataset.test_texts, fitted_max_length(task["max_length"], tokenizer, classifier.encoder))
    labels = [mapping[label] for label in dataset.test_labels]
    return {"test_accuracy": accuracy(model, tokenizer, encoded, labels, batch_size),
            "test_examples": len(encoded), "dataset": dataset.name,
            "method": adapter.config.method, "notes": notes}
