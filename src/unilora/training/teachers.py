"""The teacher a student is distilled from: a model whose outputs are matched, with its low-rank
update per adapted layer (the student's weight-space start) and what an adapter records about its
task. From an adapter of ours (any method, from `finetune`), a PEFT LoRA (on a causal LM, or a
classifier's `unilora export` with its head in head.safetensors) merged into a copy of the base
model, or a fully fine-tuned causal LM beside its base model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.errors import UniLoraError
from ..core.targeting import base_module, find_targets, is_conv1d
from ..core.tasks import task_kind
from ..engine.model import AdaptedModel
from ..models.backbones import is_causal_lm, load_causal_lm
from ..core.finite import check_finite
from ..store.validation import check_header, read_json_object, tensor_header
from ..tools.compress import LowRankUpdate, from_peft_lora, truncated
from .classification import build_classifier
from .records import read_task_adapter

HEAD_MODULE = "classifier"  # a classifier's head (models.backbones.SequenceClassifier), carried to its student


class Teacher:
    """A model whose outputs are matched: the model, its low-rank update per adapted layer (names
    as in the model), its head tensors (a classifier's) and what an adapter records about the task."""

    def __init__(self, model, updates: list[LowRankUpdate], head: dict[str, torch.Tensor], record: dict, source: str):
        self.model, self.updates, self.head, self.record, self.source = model.eval(), updates, head, record, source
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def kind(self) -> str:
        return task_kind(self.record)


def teacher_from_adapter(directory, model_name: str | None = None):
    """(tokenizer, teacher) from an adapter saved by `finetune`: a classifier or a causal LM."""
    adapter, task = read_task_adapter(directory)
    if task_kind(task) == "causal-lm":
        tokenizer, model = load_causal_lm(model_name or task["model"])
    else:
        tokenizer, model = build_classifier(model_name or task["model"], len(task["label_names"]), 0)
    model = AdaptedModel.from_pretrained(model, adapter)
    scaling = adapter.config.scaling
    with torch.no_grad():
        updates = [LowRankUpdate(slot.name, a.float().clone(), bt.t().float() * scaling)
                   for (a, bt), slot in zip(model.projection.factors(), model.layout.slots)]
    head = {k[len(HEAD_MODULE) + 1:]: v for k, v in adapter.head.items() if k.startswith(HEAD_MODULE + ".")}
    # the teacher never changes: merged, its forwards cost what the base model's do (3-10 % less
    # than unmerged for LoRA, Uni-LoRA and VB-LoRA teachers on MiniLM, batch 32 x 64 tokens)
    return tokenizer, Teacher(model.merge_and_unload(), updates, head, dict(task), f"adapter:{directory}")


def peft_teacher_kind(directory) -> str:
    """"causal-lm" for a PEFT LoRA saved from a causal LM (its task_type), else "seq-cls"."""
    meta = read_json_object(Path(directory) / "adapter_config.json", "a PEFT adapter config")
    return "causal-lm" if meta.get("task_type") == "CAUSAL_LM" else "seq-cls"


def teacher_from_peft_lora(directory, label_names: list[str] | None, model_name: str | None = None):
    """(tokenizer, teacher) from a PEFT LoRA: on a causal LM (task_type CAUSAL_LM), or on the encoder
    of a classifier with the head in head.safetensors (what `unilora export` writes for one). The
    LoRA is merged into a copy of the base model (linear layers, and GPT-2's Conv1D)."""
    directory = Path(directory)
    meta = read_json_object(directory / "adapter_config.json", "a PEFT adapter config")
    name = model_name or meta.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise UniLoraError(f"'{directory}' does not name its base model; pass --model")
    causal = peft_teacher_kind(directory) == "causal-lm"
    head_path = directory / "head.safetensors"
    if not causal and not head_path.is_file():
        raise UniLoraError(f"'{directory}' has no head.safetensors: distillation needs the trained classifier head "
                           "(`unilora export` of a `finetune` classifier writes it)")
    updates = from_peft_lora(directory)
    if causal:
        tokenizer, model = load_causal_lm(name)
        target, head, prefix = model, {}, ""
        record = {"task": "causal-lm", "model": name}
    else:
        tokenizer, model = build_classifier(name, len(label_names), 0)
        target, head, prefix = model.encoder, _read_head(head_path, model), "encoder."
        record = {"task": "seq-cls", "model": name, "label_names": list(label_names)}
    modules = dict(target.named_modules())
    with torch.no_grad():
        for update in updates:
            module = modules.get(update.name)
            conv1d = module is not None and is_conv1d(module)
            delta = update.b @ update.a  # out × in; GPT-2's Conv1D keeps its weight as in × out
            if conv1d:
                delta = delta.t()
            if not (isinstance(module, torch.nn.Linear) or conv1d) or module.weight.shape != delta.shape:
                raise UniLoraError(f"'{directory}': layer '{update.name}' is not a matching linear layer of "
                                   f"'{name}'; is this the model the adapter was trained on?")
            module.weight += delta
        if head:
            model.classifier.load_state_dict(head)
    updates = [LowRankUpdate(prefix + u.name, u.a, u.b) for u in updates]
    return tokenizer, Teacher(model, updates, head, record, f"peft-lora:{directory}")


def teacher_from_finetuned(directory, base_name: str, targets, rank: int):
    """(tokenizer, teacher) from a fully fine-tuned causal LM (a model folder) and its base model.
    The weight-space start is the truncated SVD of W_ft − W_base of every targeted linear layer, at
    the student's rank."""
    if not is_causal_lm(str(directory)):
        raise UniLoraError(f"'{directory}' is not a causal LM: a fully fine-tuned teacher is taken for causal LMs "
                           "(a fine-tuned classifier's own head cannot be carried into an adapter's)")
    tokenizer, tuned = load_causal_lm(str(directory))
    _, base = load_causal_lm(base_name)
    tuned_modules = dict(tuned.named_modules())
    updates = []
    with torch.no_grad():
        for name in find_targets(base, targets):
            module, other = base_module(base, name), tuned_modules.get(name)
            if other is None or getattr(other, "weight", None) is None or other.weight.shape != module.weight.shape:
                raise UniLoraError(f"'{directory}' has no layer '{name}' shaped as in '{base_name}'; is it a fine-tune "
                                   "of that model?")
            delta = other.weight.float() - module.weight.float()
            check_finite({name: delta}, f"'{directory}'", "the fine-tuned weights are damaged")
            updates.append(truncated(name, delta.t() if is_conv1d(module) else delta, rank))  # Conv1D: in × out
    del base
    record = {"task": "causal-lm", "model": base_name}
    return tokenizer, Teacher(tuned, updates, {}, record, f"finetuned:{directory}")


def _read_head(path: Path, classifier) -> dict[str, torch.Tensor]:
    expected = {f"{HEAD_MODULE}.{k}": (tuple(v.shape), "float") for k, v in classifier.classifier.state_dict().items()}
    header = tensor_header(path)
    check_header(path, header, expected)
    tensors = load_file(str(path))
    check_finite(tensors, f"'{path}'", "the head is damaged")
    return {k[len(HEAD_MODULE) + 1:]: v.float() for k, v in tensors.items()}
