"""Parameter accounting for configs of known architectures, built on the meta device (no weights)."""

from __future__ import annotations

import torch
import transformers

from ..core.errors import UniLoraError
from ..engine.model import get_model
from ..methods import recipe_config

ROBERTA_SIZES = {
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

# "qv": query and value; "all": every linear layer of the encoder (q, k, v, o, up, down)
TARGET_PRESETS = {
    "qv": ["query", "value"],
    "all": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
}


def build_roberta_skeleton(arch: str) -> torch.nn.Module:
    if arch not in ROBERTA_SIZES:
        raise UniLoraError(f"unknown arch '{arch}'; choose one of {', '.join(ROBERTA_SIZES)}")
    config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                        **ROBERTA_SIZES[arch])
    with torch.device("meta"):
        return transformers.RobertaModel(config, add_pooling_layer=False)


def count_for_arch(arch: str, targets: str = "qv", method: str = "unilora", **fields) -> dict:
    """`unilora count`: the counts of `method` on RoBERTa's `targets` at the papers' settings, with
    the AdapterConfig `fields` that are not None over them."""
    if targets not in TARGET_PRESETS:
        raise UniLoraError(f"unknown targets '{targets}'; choose one of {', '.join(TARGET_PRESETS)}")
    config = recipe_config(method, TARGET_PRESETS[targets], paper=True, **fields)
    model = get_model(build_roberta_skeleton(arch), config)
    return {
        "arch": arch,
        "method": config.method,
        "adapted_layers": len(model.layout),
        "D": model.layout.D,
        "trainable_params": model.trainable_parameter_count(),
        "stored_params": model.stored_param_count(),
        "stored_bytes": model.stored_bytes(),
    }
