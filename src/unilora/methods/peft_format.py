"""PEFT's adapter directories as a method reads and writes them: the key names PEFT gives a layer's
tensors, checked reading of its config's numbers, and the adapted modules in the model's order.

Each method with a PEFT counterpart maps itself in its own file (`Projection.peft_state`,
`peft_config`, `from_peft`); tools/peft_native.py opens the directory, finds the method by PEFT's
`peft_type`, and writes the result. As PEFT does, a method's tensors are named `<type>_<part>` (the
type in lower case: `vblora_logits_A`); any other tensor under `base_model.model.` is a trained head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UniLoraError
from ..core.layout import Slot
from ..core.targeting import base_module, is_adaptable

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of a layer's tensors


def layer_key(name: str, part: str) -> str:
    """PEFT's state-dict key of tensor `part` (e.g. "unilora_indices_A") of layer `name`."""
    return f"{PEFT_PREFIX}{name}.{part}"


def shared_key(part: str) -> str:
    """PEFT's key of a tensor shared by all layers (e.g. "vblora_vector_bank")."""
    return f"base_model.{part}"


def natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10 (model order for numbered blocks)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class PeftReading:
    """What a method makes of PEFT's directory: our layout's slots, the AdapterConfig fields, the
    tensors of our adapter file, and (an SVD method) the base model's factors it checked against."""

    slots: list[Slot]
    options: dict
    tensors: dict[str, torch.Tensor]
    factors: list | None = None


class PeftSource:
    """One open PEFT directory: its config, its tensors' shapes (read from the header) and the tensors."""

    def __init__(self, directory: Path, config: dict, handle, shapes: dict[str, tuple], model: nn.Module | None):
        self.directory = Path(directory)
        self.config = config
        self.handle = handle
        self.shapes = shapes
        self.model = model  # the base model, where the method needs it (given by --model)
        self.weights = self.directory / "adapter_model.safetensors"

    def config_error(self, message: str) -> UniLoraError:
        return UniLoraError(f"'{self.directory}/adapter_config.json'{message}")

    def integers(self, *keys: str) -> list[int]:
        """Positive integers of PEFT's config, refused in one line otherwise."""
        values = [self.config.get(key) for key in keys]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise self.config_error(f" lacks a positive integer {' / '.join(keys)}")
        return values

    def modules(self, part: str) -> list[str]:
        """The layers holding tensor `part`, in natural order."""
        suffix = f".{part}"
        return sorted({key[len(PEFT_PREFIX):-len(suffix)] for key in self.shapes
                       if key.startswith(PEFT_PREFIX) and key.endswith(suffix)}, key=natural)

    def shape(self, key: str) -> tuple | None:
        return self.shapes.get(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)

    def model_order(self, modules: set[str], kind: str) -> list[str]:
        """The adapted modules in the model's order, each checked to be a linear layer there."""
        if self.model is None:
            raise UniLoraError(f"PEFT {kind} files do not record their layers' order and input sizes: give the base "
                               "model it was trained on (unilora convert ... --model NAME_OR_PATH)")
        order = [name for name, _ in self.model.named_modules() if name in modules]
        missing = sorted(modules - set(order))
        if missing:
            raise UniLoraError(f"the PEFT adapter adapts '{missing[0]}', which the given model lacks; give the model "
                               "it was trained on")
        for name in order:
            if not is_adaptable(base_module(self.model, name)):
                raise UniLoraError(f"the PEFT adapter adapts '{name}', which is not a linear layer in the given model")
        return order
