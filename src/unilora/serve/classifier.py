"""Classifier adapters (trained with `--task seq-cls`) on one encoder: the model side of
POST /v1/classify, run on the worker thread between forwards.

A classifier adapter carries its own head, whose width is its number of labels. Adapters are
grouped by that number: each group ("family") is one `SequenceClassifier` with its own LRU of
adapters and its own copy of the encoder, taken from a pristine one (an encoder carries the
adapted layers of one wrapper only): memory is one encoder per label count, plus one.
"""

from __future__ import annotations

import copy

import torch

from ..core.tasks import task_kind
from ..models.backbones import SequenceClassifier, load_backbone
from ..store.names import BadAdapter
from .adapters import PreparedAdapter
from .residency import Residency

MAX_LENGTH = 512


class Classifier:
    def __init__(self, model_name: str, metrics, max_resident: int, max_bytes: int, factor_cache_bytes: int,
                 loaded=None, device: str = "cpu"):
        self.tokenizer, self.encoder = loaded or load_backbone(model_name)
        self.device = torch.device(device)
        self.encoder = self.encoder.to(self.device).eval().requires_grad_(False)
        self.metrics = metrics
        self.bounds = (max_resident, max_bytes, factor_cache_bytes)
        self.families: dict[int, Residency] = {}
        self.tasks: dict[str, dict] = {}  # the task record of each adapter read, by store name

    # --- from request threads (adapters.prepare_adapter) -----------------------------------------
    def hold_if_resident(self, name: str, signature, count: int = 1) -> bool:
        return any(family.hold_if_resident(name, signature, count) for family in list(self.families.values()))

    def release(self, name: str) -> None:
        for family in list(self.families.values()):
            if family.holds.get(name):
                family.release(name)
                return

    # --- on the worker thread ------------------------------------------------------------------
    def run(self, adapter: PreparedAdapter, texts: list[str]) -> tuple[list[str], torch.Tensor, int]:
        """(label names, probabilities per text, tokens read) of one request."""
        try:
            task = adapter.file.task if adapter.file is not None else self.tasks.get(adapter.name)
            if not task or task_kind(task) != "seq-cls":
                raise BadAdapter(f"adapter '{adapter.name}' is not a classifier (train it with --task seq-cls); this "
                                 "server serves classifiers")
            labels = list(task["label_names"])
            family = self._family(len(labels))
            internal = family.acquire(adapter.name, adapter.file, adapter.signature)
        finally:
            if adapter.file is None:  # held since it was prepared: acquired, or failed
                self.release(adapter.name)
        self.tasks[adapter.name] = task
        family.trim({internal})
        encoded = self.tokenizer(texts, truncation=True, max_length=min(task.get("max_length", MAX_LENGTH), MAX_LENGTH),
                                 padding=True, return_tensors="pt")
        out = family.served(input_ids=encoded["input_ids"].to(self.device),
                            attention_mask=encoded["attention_mask"].to(self.device),
                            adapter_names=[internal] * len(texts))
        return labels, torch.softmax(out.logits.float(), dim=-1).cpu(), int(encoded["attention_mask"].sum())

    def _family(self, num_labels: int) -> Residency:
        family = self.families.get(num_labels)
        if family is None:
            head = SequenceClassifier(copy.deepcopy(self.encoder), num_labels).to(self.device).eval().requires_grad_(False)
            family = self.families[num_labels] = Residency(head, *self.bounds, metrics=self.metrics)
        return family
