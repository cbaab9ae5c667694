"""`unilora compress` by distillation as one library call: choose the teacher and the texts to match
it on, train the student (distill.py), record how it went beside the teacher's own task record, and
save the adapter; a Python caller gets the adapter the command line gets."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import UniLoraError
from ..data.lm import BUILTIN_LM_TASKS, LMDataset
from ..data.sources import DataSpec
from ..data.text import BUILTIN_DATASETS, TextDataset, has_labels, texts_dataset
from ..engine.model import AdaptedModel
from ..methods import recipe_config, recipe_of
from ..models.backbones import is_embedded
from ..store.io import ADAPTER_FILES
from ..store.writing import check_writable
from ..tools.compress import TARGETS_OF_A_LORA
from .causal_lm import lm_dataset_of
from .classification import dataset_of
from .distill import distill
from .loop import TrainSettings
from .recipes import distillation_group_lrs
from .runs import TASK_DEFAULTS
from .teachers import Teacher, peft_teacher_kind, teacher_from_adapter, teacher_from_finetuned, teacher_from_peft_lora

ONE_TEACHER = ("distillation takes one teacher: --adapter DIR (an adapter from `unilora finetune`), --peft-lora DIR "
               "(a PEFT LoRA: on a causal LM, or a classifier's `unilora export` with head.safetensors) or "
               "--finetuned-model DIR (a fully fine-tuned causal LM, with --model BASE)")


@dataclass
class DistillRun:
    """What `distill_adapter` made: the student (saved), the teacher, the data and the report."""

    out: Path
    student: AdaptedModel
    teacher: Teacher
    dataset: TextDataset | LMDataset
    report: dict  # distill.distill's: the scores before and after, the kept gain, the timings
    summary: dict  # what the adapter records under task["distillation"]


def distill_adapter(out: str | Path, *, adapter: str | Path | None = None, peft_lora: str | Path | None = None,
                    finetuned_model: str | Path | None = None, model: str | None = None, data: DataSpec | None = None,
                    label_names: list[str] | None = None, method: str = "unilora", fields: dict | None = None,
                    targets=None, temperature: float | None = None, hidden_weight: float | None = None,
                    hidden_layers: str | None = None, fit_steps: int = 0, fit_lr: float = 1e-3,
                    group_lrs: dict[str, float] | None = None, max_length: int | None = None, seed: int = 0,
                    overwrite: bool = False, **schedule) -> DistillRun:
    """`unilora compress --adapter | --peft-lora | --finetuned-model`: a compact `method` adapter
    trained to match one teacher on `data` (default: the data an `adapter` teacher records), saved
    to `out`, which is checked first. `fields`: AdapterConfig fields over the method's recipe (its
    "seed" defaults to `seed`); `group_lrs`: rates over distillation's own; `schedule`:
    TrainSettings fields (epochs, batch_size, group_by_length, eval_every, progress); grouping by
    length is left to the plan unless given, as on the command line."""
    out, data = Path(out), data or DataSpec()
    schedule.setdefault("group_by_length", None)
    check_writable(out, ADAPTER_FILES, overwrite, "adapter")
    if targets and (adapter or peft_lora):
        raise UniLoraError(TARGETS_OF_A_LORA)
    if sum(map(bool, (adapter, peft_lora, finetuned_model))) != 1:
        raise UniLoraError(ONE_TEACHER)
    if data.data is None and not adapter:
        raise UniLoraError(f"{'--peft-lora' if peft_lora else '--finetuned-model'} with distillation needs "
                           "--data: the texts to match the teacher on")
    if finetuned_model and not model:
        raise UniLoraError("--finetuned-model needs --model BASE: the model it was fine-tuned from, which the "
                           "compact adapter is trained on")
    fields = dict(fields or {})
    dataset = None
    peft_classifier = bool(peft_lora) and peft_teacher_kind(peft_lora) == "seq-cls"
    if label_names and not peft_classifier:
        raise UniLoraError("--label-names names the classes of a PEFT LoRA classifier (--peft-lora); other teachers "
                           "record their classes or have none: drop the option")
    if peft_classifier:
        # a PEFT classifier: its classes, in the order of its head's outputs, come from labelled data or the option
        if has_labels(data.data, data.label_column, data.split, data.data_config):
            dataset = data.load("seq-cls")
            label_names = dataset.label_names
        elif not label_names:
            raise UniLoraError("a PEFT LoRA teacher with unlabelled texts needs --label-names A,B,... (its classes, "
                               "in the order of its head's outputs)")
    if adapter:
        tokenizer, teacher = teacher_from_adapter(adapter, model)
    elif peft_lora:
        tokenizer, teacher = teacher_from_peft_lora(peft_lora, label_names, model)
    else:  # the SVD of its change is the weight-space start, at the student's rank
        rank = fields.get("rank") or recipe_of(method).defaults.get("rank", 8)
        tokenizer, teacher = teacher_from_finetuned(finetuned_model, model, targets or "all-linear", rank)
    dataset = dataset or _texts_for(teacher, data, adapter)
    # the method's own defaults (its rank included), not the teacher's: the student is trained, not fitted;
    # VB-LoRA's b as `finetune` picks it: the recipe's on the embedded model, else fitted to the model
    config = recipe_config(method, [u.name for u in teacher.updates], run_seed=seed,
                           tuned_model=is_embedded(teacher.record["model"]), **fields)
    given = dict(group_lrs or {})
    settings = TrainSettings(group_lrs={**distillation_group_lrs(teacher.kind, method), **given},
                             max_length=max_length or teacher.record.get("max_length") or TASK_DEFAULTS[teacher.kind][1],
                             seed=seed, fit_rates="theta" not in given, **schedule)
    started = time.time()
    student, report = distill(teacher, tokenizer, config, dataset, settings, fit_steps=fit_steps,
                              temperature=temperature, hidden_weight=hidden_weight, fit_lr=fit_lr,
                              hidden_layers=hidden_layers)
    causal = teacher.kind == "causal-lm"
    summary = {"weight_space_fit": report["before"],
               "distilled": {k: v for k, v in report["after"].items() if k != "epoch"},
               "base_model": report["base"], "kept_gain": report["kept_gain"],
               "kept_gain_interval": report["kept_gain_interval"],
               "kept_gain_by_measure": report["kept_gain_by_measure"], "settings": asdict(settings),
               "temperature": report["temperature"], "hidden_weight": report["hidden_weight"],
               "hidden_layers": report["hidden_layers"],
               "teacher_pass_seconds": round(report["teacher_pass_seconds"], 2),
               "train_examples": len(dataset.train if causal else dataset.train_texts),
               "seconds": round(time.time() - started, 1)}
    # the teacher's record first: `evaluate` then scores the student on the teacher's own task
    record = {**report["record"], **teacher.record, "max_length": report["max_length"],
              "compressed_from": teacher.source, "distillation": summary}
    student.save_pretrained(out, task=record, overwrite=overwrite)
    return DistillRun(out, student, teacher, dataset, report, summary)


def _texts_for(teacher: Teacher, data: DataSpec, adapter) -> TextDataset | LMDataset:
    """The texts to match the teacher on: `data` (labelled or not), else the data it was trained on."""
    causal = teacher.kind == "causal-lm"
    if isinstance(data.data, str) and data.data in (BUILTIN_DATASETS if causal else BUILTIN_LM_TASKS):
        raise UniLoraError(f"'{data.data}' is {'classification' if causal else 'causal-LM'} data and the teacher is a "
                           f"{'causal LM' if causal else 'classifier'}; give it "
                           f"{'text, prompt/completion or chat data' if causal else 'texts to classify'}")
    if causal:
        if data.data:
            return data.load("causal-lm")
        return lm_dataset_of(teacher.record, adapter).limited(data.train_limit, data.test_limit, seed=0)
    if data.data is not None and has_labels(data.data, data.label_column, data.split, data.data_config):
        return data.load("seq-cls")
    dataset = (texts_dataset(data.data, data.text_column, teacher.record["label_names"], split=data.split,
                             data_config=data.data_config) if data.data is not None
               else dataset_of(teacher.record, adapter))
    return dataset.limited(data.train_limit, data.test_limit, seed=0)
