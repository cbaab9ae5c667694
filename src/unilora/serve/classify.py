"""POST /v1/classify: classifier adapters (trained with `--task seq-cls`) on one encoder.

A classifier adapter carries its own head, whose width is its number of labels. Adapters are
grouped by that number: each group ("family") is one `SequenceClassifier` with its own LRU of
adapters and its own copy of the encoder, taken from a pristine one (an encoder carries the
adapted layers of one wrapper only): memory is one encoder per label count, plus one. Each request
runs as one forward on the worker thread, between generation steps.
"""

from __future__ import annotations

import asyncio
import copy

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core.tasks import task_kind
from ..models.backbones import SequenceClassifier, load_backbone
from .protocol import ClassifyRequest, RequestError, parse
from .residency import Residency
from ..store.names import BadAdapter
from ..store.source import AdapterStore
from .worker import Overloaded

MAX_LENGTH = 512


class Classifier:
    def __init__(self, model_name: str, store: AdapterStore, metrics, max_resident: int, max_bytes: int,
                 factor_cache_bytes: int, loaded=None, device: str = "cpu"):
        self.tokenizer, self.encoder = loaded or load_backbone(model_name)
        self.device = torch.device(device)
        self.encoder = self.encoder.to(self.device).eval().requires_grad_(False)
        self.store = store
        self.metrics = metrics
        self.bounds = (max_resident, max_bytes, factor_cache_bytes)
        self.families: dict[int, Residency] = {}
        self.tasks: dict[str, dict] = {}  # the task record of each adapter read, by store name

    def signature_of(self, name: str):
        return next((f.signature_of(name) for f in self.families.values() if f.signature_of(name) is not None), None)

    def prepared(self, name: str):
        signature = self.store.signature(name)
        if self.signature_of(name) == signature:
            return None, signature
        return self.store.read(name)

    async def answer(self, request: Request, raw: bytes, worker, server) -> JSONResponse:
        req = parse(ClassifyRequest, raw)
        name = server.adapter_of(req.model)
        if name is None:
            raise RequestError(400, "the base model has no trained classifier head; name a classifier adapter")
        adapter, signature = await run_in_threadpool(self.prepared, name)
        loop = asyncio.get_running_loop()
        answer = loop.create_future()

        def done(result, error):
            def settle():
                if not answer.done():
                    answer.set_exception(error) if error is not None else answer.set_result(result)
            loop.call_soon_threadsafe(settle)

        try:
            worker.call(lambda: self.run(name, adapter, signature, req.input), done)
        except Overloaded as err:
            raise RequestError(503, str(err), retry_after=1) from None
        labels, probs, tokens = await answer
        data = [{"index": i, "label": labels[int(row.argmax())], "probs": dict(zip(labels, map(float, row)))}
                for i, row in enumerate(probs)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "model": req.model, "data": data, "usage": usage})

    # --- on the worker thread ------------------------------------------------------------------
    def run(self, name: str, adapter, signature, texts: list[str]) -> tuple[list[str], torch.Tensor, int]:
        if adapter is None and self.signature_of(name) != signature:
            adapter, signature = self.store.read(name)  # evicted since the request looked
        task = adapter.task if adapter is not None else self.tasks.get(name)
        if not task or task_kind(task) != "seq-cls":
            raise BadAdapter(f"adapter '{name}' is not a classifier (train it with --task seq-cls); this server "
                             "serves classifiers")
        labels = list(task["label_names"])
        family = self._family(len(labels))
        internal = family.acquire(name, adapter, signature)
        self.tasks[name] = task
        family.trim({internal})
        encoded = self.tokenizer(texts, truncation=True, max_length=min(task.get("max_length", MAX_LENGTH), MAX_LENGTH),
                                 padding=True, return_tensors="pt")
        out = family.served(input_ids=encoded["input_ids"].to(self.device),
                            attention_mask=encoded["attention_mask"].to(self.device), adapter_names=[internal] * len(texts))
        return labels, torch.softmax(out.logits.float(), dim=-1).cpu(), int(encoded["attention_mask"].sum())

    def _family(self, num_labels: int) -> Residency:
        family = self.families.get(num_labels)
        if family is None:
            head = SequenceClassifier(copy.deepcopy(self.encoder), num_labels).to(self.device).eval().requires_grad_(False)
            family = self.families[num_labels] = Residency(head, *self.bounds, metrics=self.metrics)
        return family
