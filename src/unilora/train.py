"""Fine-tuning and evaluation loop for text classification (single process or DDP via torchrun)."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .backbones import SequenceClassifier, load_backbone
from .config import AdapterConfig
from .data import TextDataset
from .io import write_json_atomic
from .model import AdaptedModel, get_model


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


def finetune(model_name: str, dataset: TextDataset, adapter: AdapterConfig, settings: TrainSettings,
             out_dir: str | Path) -> dict:
    """Train an adapter; write OUT/adapter (the adapter) and OUT/metrics.json. Returns the metrics."""
    rank, world = _distributed()
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    tokenizer, classifier = build_classifier(model_name, len(dataset.label_names), settings.seed)
    model: AdaptedModel = get_model(classifier, adapter)
    train_ids = encode(tokenizer, dataset.train_texts, settings.max_length)
    test_ids = encode(tokenizer, dataset.test_texts, settings.max_length)

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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        task = {"model": model_name, "dataset": dataset.name, "label_names": dataset.label_names,
                "max_length": settings.max_length}
        model.save_pretrained(out / "adapter", task=task)
        metrics = {
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
            "adapter": adapter.to_dict(),
            "settings": asdict(settings),
        }
        write_json_atomic(out / "metrics.json", metrics)
    if world > 1:
        dist.barrier()
    return metrics


def evaluate_adapter(adapter_dir: str | Path, dataset: TextDataset, model_name: str | None = None,
                     batch_size: int = 128) -> dict:
    """Accuracy of a saved classification adapter on the dataset's test split."""
    from .errors import UniLoraError
    from .io import read_adapter_dir

    meta, _ = read_adapter_dir(adapter_dir)
    task = meta.get("task")
    if not task:
        raise UniLoraError(f"'{adapter_dir}' was not saved by `unilora finetune` (no task info); evaluate it in Python")
    if len(task["label_names"]) != len(dataset.label_names):
        raise UniLoraError(
            f"the adapter predicts {len(task['label_names'])} labels {task['label_names']}, "
            f"the data has {len(dataset.label_names)} {dataset.label_names}"
        )
    tokenizer, classifier = build_classifier(model_name or task["model"], len(task["label_names"]), 0)
    model = AdaptedModel.from_pretrained(classifier, adapter_dir)
    encoded = encode(tokenizer, dataset.test_texts, task["max_length"])
    return {"test_accuracy": accuracy(model, tokenizer, encoded, dataset.test_labels, batch_size),
            "test_examples": len(encoded), "method": meta["adapter"]["method"]}
