"""`unilora compress --data`: distil a classifier into a compact adapter by its behaviour.

A weight-space fit (compress.py) keeps about 1 % of a LoRA update at the sizes that make Uni-LoRA
worth having: most directions of ΔW cannot be expressed with d << D numbers, and the fit spends
them evenly, whether a direction matters for the outputs or not. Here the source model is the
teacher and the compact adapter is trained to give its outputs (KL divergence of the softened
class probabilities) on texts the user gives, without labels, starting from the weight-space fit.
The teacher's trained head is carried over unchanged, so the student is used like any adapter.

Teachers: a classifier adapter of ours (any method, from `finetune`), or a PEFT LoRA exported
from one (`unilora export`: the LoRA on the encoder, the head in head.safetensors beside it).
The loop is the shared training core (train.train) with its run plan.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .classification import build_classifier, collate, encode, predict_logits
from .compress import LowRankUpdate, compress, from_peft_lora
from .config import AdapterConfig
from .data import TextDataset
from .errors import UniLoraError
from .model import AdaptedModel, get_model
from .plan import plan_run
from .train import Task, TrainSettings, fitted_max_length, read_task_adapter, task_kind, train
from .validation import check_finite, check_header, tensor_header

HEAD_MODULE = "classifier"


class Teacher:
    """A classifier whose outputs are matched: the model, its low-rank update per adapted layer
    (names as in the classifier), its head tensors and what an adapter records about the task."""

    def __init__(self, model, updates: list[LowRankUpdate], head: dict[str, torch.Tensor], record: dict, source: str):
        self.model, self.updates, self.head, self.record, self.source = model.eval(), updates, head, record, source
        for p in self.model.parameters():
            p.requires_grad_(False)


def teacher_from_adapter(directory, model_name: str | None = None):
    """(tokenizer, teacher) from a classifier adapter saved by `finetune`."""
    adapter, task = read_task_adapter(directory)
    if task_kind(task) != "seq-cls":
        raise UniLoraError(f"'{directory}' is a {task_kind(task)} adapter; distillation takes classifier adapters")
    tokenizer, classifier = build_classifier(model_name or task["model"], len(task["label_names"]), 0)
    model = AdaptedModel.from_pretrained(classifier, adapter)
    scaling = adapter.config.scaling
    with torch.no_grad():
        updates = [LowRankUpdate(slot.name, a.float().clone(), bt.t().float() * scaling)
                   for (a, bt), slot in zip(model.projection.factors(), model.layout.slots)]
    head = {k[len(HEAD_MODULE) + 1:]: v for k, v in adapter.head.items() if k.startswith(HEAD_MODULE + ".")}
    return tokenizer, Teacher(model, updates, head, dict(task), f"adapter:{directory}")


def teacher_from_peft_lora(directory, label_names: list[str], model_name: str | None = None):
    """(tokenizer, teacher) from a PEFT LoRA on the encoder with the head in head.safetensors
    (what `unilora export` writes for a classifier). The LoRA is merged into a copy of the encoder."""
    from .validation import read_json_object

    directory = Path(directory)
    meta = read_json_object(directory / "adapter_config.json", "a PEFT adapter config")
    name = model_name or meta.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise UniLoraError(f"'{directory}' does not name its base model; pass --model")
    head_path = directory / "head.safetensors"
    if not head_path.is_file():
        raise UniLoraError(f"'{directory}' has no head.safetensors: distillation needs the trained classifier head "
                           "(`unilora export` of a `finetune` classifier writes it)")
    tokenizer, classifier = build_classifier(name, len(label_names), 0)
    head = _read_head(head_path, classifier)
    updates = from_peft_lora(directory)
    modules = dict(classifier.encoder.named_modules())
    with torch.no_grad():
        for update in updates:
            module = modules.get(update.name)
            if not isinstance(module, torch.nn.Linear) or module.weight.shape != (update.b.shape[0], update.a.shape[1]):
                raise UniLoraError(f"'{directory}': layer '{update.name}' is not a matching linear layer of "
                                   f"'{name}'; is this the model the adapter was trained on?")
            module.weight += update.b @ update.a
        classifier.classifier.load_state_dict(head)
    updates = [LowRankUpdate(f"encoder.{u.name}", u.a, u.b) for u in updates]
    record = {"task": "seq-cls", "model": name, "label_names": list(label_names)}
    return tokenizer, Teacher(classifier, updates, head, record, f"peft-lora:{directory}")


def _read_head(path: Path, classifier) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    expected = {f"{HEAD_MODULE}.{k}": (tuple(v.shape), "float") for k, v in classifier.classifier.state_dict().items()}
    header = tensor_header(path)
    check_header(path, header, expected)
    tensors = load_file(str(path))
    check_finite(tensors, f"'{path}'", "the head is damaged")
    return {k[len(HEAD_MODULE) + 1:]: v.float() for k, v in tensors.items()}


class DistillTask(Task):
    """Match the teacher's class probabilities on unlabelled texts; score agreement (and accuracy
    where the held-out texts have labels)."""

    kind = "seq-cls"

    def __init__(self, teacher: Teacher, tokenizer, dataset: TextDataset, max_length: int, temperature: float = 2.0):
        self.teacher, self.tokenizer, self.temperature = teacher, tokenizer, temperature
        self.data_name = dataset.name
        self.train_examples = encode(tokenizer, dataset.train_texts, max_length)
        self.test_examples = encode(tokenizer, dataset.test_texts, max_length)
        self.test_labels = dataset.test_labels
        self.teacher_test = self._logits(teacher.model, self.test_examples)

    def batch(self, indices: list[int]) -> dict:
        return collate(self.tokenizer, [self.train_examples[i] for i in indices])

    def loss(self, model, batch: dict) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher.model(**batch).logits.float() / t, dim=-1)
        student = F.log_softmax(model(**batch).logits.float() / t, dim=-1)
        # KL(teacher || student), scaled by t² so its gradients keep their size across temperatures
        return F.kl_div(student, target, log_target=True, reduction="batchmean") * t * t

    def _logits(self, model, examples: list[list[int]]) -> torch.Tensor:
        if not examples:
            raise UniLoraError("the held-out split holds no text to compare teacher and student on")
        return predict_logits(model, self.tokenizer, examples, 128)

    def evaluate(self, model, final: bool) -> dict:
        logits = self._logits(model, self.test_examples)
        predicted, teacher = logits.argmax(-1), self.teacher_test.argmax(-1)
        # KL(teacher || student) at temperature 1, nats per text: 0 when the outputs are the same
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(self.teacher_test, -1), log_target=True,
                      reduction="batchmean")
        result = {"agreement": float((predicted == teacher).float().mean()), "kl_to_teacher": float(kl)}
        if self.test_labels:
            labels = torch.tensor(self.test_labels)
            result["student_accuracy"] = float((predicted == labels).float().mean())
            result["teacher_accuracy"] = float((teacher == labels).float().mean())
        return result

    def summary(self, result: dict) -> str:
        text = f"agreement with the teacher {result['agreement']:.4f} (KL {result['kl_to_teacher']:.2e})"
        if "student_accuracy" in result:
            text += f", accuracy {result['student_accuracy']:.4f} (teacher {result['teacher_accuracy']:.4f})"
        return text


def distill(teacher: Teacher, tokenizer, config: AdapterConfig, dataset: TextDataset, settings: TrainSettings,
            fit_steps: int = 0, temperature: float = 2.0):
    """The compact adapter trained to match `teacher`. Returns (student model, report)."""
    names = [u.name for u in teacher.updates]
    config = AdapterConfig(**{**config.to_dict(), "target_modules": names, "modules_to_save": [HEAD_MODULE]})
    _, classifier = build_classifier(teacher.record["model"], len(teacher.record["label_names"]), 0)
    max_length = fitted_max_length(teacher.record.get("max_length", settings.max_length), tokenizer, classifier.encoder)
    task = DistillTask(teacher, tokenizer, dataset, max_length, temperature)
    with torch.no_grad():
        classifier.classifier.load_state_dict(teacher.head)
    base = task.evaluate(classifier, final=False)  # the teacher's head on the base encoder: the gain's zero
    torch.manual_seed(settings.seed)
    student = get_model(classifier, config)
    order = {slot.name: i for i, slot in enumerate(student.layout.slots)}
    updates = sorted(teacher.updates, key=lambda u: order[u.name])  # the fit's layout = the student's
    fitted, layout, fit_report = compress(updates, student.projection.config, steps=fit_steps)
    assert layout.slots == student.layout.slots, "the weight-space fit must share the student's layout"
    student.projection.load_state_dict(fitted.state_dict())
    _carry_head(student, teacher.head)
    before = task.evaluate(student, final=False)
    groups = [g for g in student.parameter_groups(settings.lr, settings.group_lrs) if g.get("name") != "head"]
    for p in student.head_parameters().values():
        p.requires_grad_(False)  # the teacher's head, carried as it is
    chosen = plan_run(settings, task.kind, task.train_size())
    if chosen:
        print(f"note: {'; '.join(chosen.values())} (--epochs and --batch-size set them)", file=sys.stderr)
    history = train(student, task, settings, groups)
    after = history[-1]
    report = {"weight_space": fit_report, "base": base, "before": before, "after": after, "history": history,
              "max_length": max_length, "plan": chosen}
    if "student_accuracy" in after:
        gain = after["teacher_accuracy"] - base["student_accuracy"]
        report["kept_gain"] = (after["student_accuracy"] - base["student_accuracy"]) / gain if gain > 0 else None
    return student.eval(), report


def _carry_head(student: AdaptedModel, head: dict[str, torch.Tensor]) -> None:
    params = student.head_parameters()
    with torch.no_grad():
        for key, value in head.items():
            param = params.get(f"{HEAD_MODULE}.{key}")
            if param is None or param.shape != value.shape:
                raise UniLoraError(f"the teacher's head tensor '{key}' {tuple(value.shape)} has no match in the student")
            param.copy_(value)


def read_teacher(adapter: str | None, peft_lora: str | None, label_names: list[str] | None, model_name: str | None):
    """(tokenizer, teacher): our classifier adapter, else a PEFT LoRA export with its head."""
    if adapter:
        return teacher_from_adapter(adapter, model_name)
    return teacher_from_peft_lora(peft_lora, label_names, model_name)
