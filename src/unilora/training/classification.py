"""Text classification: an encoder with mean pooling and a trained head (`--task seq-cls`)."""

from __future__ import annotations

import torch

from ..core.errors import UniLoraError
from ..data.text import BUILTIN_DATASETS, TextDataset, load_dataset
from ..engine.model import AdaptedModel
from ..models.backbones import SequenceClassifier, load_backbone
from .loop import Task, TrainSettings, fitted_max_length
from .records import hf_options, note_changes, recorded_data


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(tokenizer, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({"input_ids": sequences}, return_tensors="pt")


@torch.no_grad()
def predict_logits(model, tokenizer, encoded: list[list[int]], batch_size: int) -> torch.Tensor:
    """Float logits of every example, in the given order (batched by length: little padding)."""
    return predict(model, tokenizer, encoded, batch_size)[0]


def predict(model, tokenizer, encoded: list[list[int]], batch_size: int,
            every_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and pooled features (the head's input; with `every_layer`, every encoder layer's,
    examples x layers x hidden) of every example, in the given order."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits, pooled = [None] * len(encoded), [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out = model(**collate(tokenizer, [encoded[i] for i in idx]), output_hidden_states=every_layer)
        features = out.layer_pooled if every_layer else out.pooled
        for i, row, text_features in zip(idx, out.logits.float(), features.float()):
            logits[i], pooled[i] = row, text_features
    return (torch.stack(logits), torch.stack(pooled)) if encoded else (torch.zeros(0), torch.zeros(0))


def accuracy(model, tokenizer, encoded: list[list[int]], labels: list[int], batch_size: int) -> float:
    if not encoded:
        return 0.0
    predicted = predict_logits(model, tokenizer, encoded, batch_size).argmax(-1)
    return int((predicted == torch.tensor(labels)).sum()) / len(labels)


def build_classifier(model_name: str, num_labels: int, seed: int):
    tokenizer, encoder = load_backbone(model_name)
    return tokenizer, SequenceClassifier(encoder, num_labels, seed=seed)


class ClassificationTask(Task):
    kind = "seq-cls"

    def build(self, model_name: str, settings: TrainSettings) -> torch.nn.Module:
        self.tokenizer, classifier = build_classifier(model_name, len(self.dataset.label_names), settings.seed)
        self.max_length = fitted_max_length(settings.max_length, self.tokenizer, classifier.encoder)
        self.train_examples = encode(self.tokenizer, self.dataset.train_texts, self.max_length)
        self.test_examples = encode(self.tokenizer, self.dataset.test_texts, self.max_length)
        self.eval_batch_size = settings.eval_batch_size
        return classifier

    def batch(self, indices: list[int]) -> dict:
        batch = collate(self.tokenizer, [self.train_examples[i] for i in indices])
        batch["labels"] = torch.tensor([self.dataset.train_labels[i] for i in indices])
        return batch

    def evaluate(self, model, final: bool) -> dict:
        return {"test_accuracy": accuracy(model, self.tokenizer, self.test_examples, self.dataset.test_labels,
                                          self.eval_batch_size)}

    def summary(self, result: dict) -> str:
        return f"test accuracy {result['test_accuracy']:.4f}"

    def record(self) -> dict:
        return {"label_names": self.dataset.label_names, "max_length": self.max_length, "data": self.dataset.source}


def dataset_of(task: dict, adapter_dir) -> TextDataset:
    """The data an adapter was trained on, as recorded by `finetune`."""
    spec, source = recorded_data(task, adapter_dir, BUILTIN_DATASETS)
    dataset = load_dataset(spec, source.get("text_column", "text"), source.get("label_column", "label"),
                           source.get("test_data"), seed=0, **hf_options(source))
    note_changes(source, dataset)
    return dataset


def label_mapping(adapter_labels: list[str], data_labels: list[str]) -> list[int]:
    """For each data label id, the adapter's id of the same name; refuses names it does not know."""
    unknown = [name for name in data_labels if name not in adapter_labels]
    if unknown:
        raise UniLoraError(
            f"the data has labels {unknown[:5]} that this adapter does not know (it predicts {adapter_labels}); "
            "evaluate on data labelled with the same names"
        )
    return [adapter_labels.index(name) for name in data_labels]


def evaluate_classifier(adapter, dataset: TextDataset | None, model_name: str | None, batch_size: int,
                        limits: tuple[int | None, int | None]) -> dict:
    """Accuracy of a classification adapter (labels matched by name)."""
    task = adapter.task
    if dataset is None:
        dataset = dataset_of(task, adapter.path).limited(*limits, seed=0)
    if not isinstance(dataset, TextDataset):
        raise UniLoraError(f"'{adapter.path}' is a classifier; evaluate it on labelled data (text and label columns)")
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
