"""transformers.Trainer and TRL with unilora models.

transformers saves and resumes only its own models and PEFT's; any other module is saved as a
full state dict (base weights included) and cannot be resumed. `AdapterTrainerMixin` is the
smallest hook that changes this, for any Trainer subclass:

- checkpoints and `save_model` write our adapter folder (adapter + trained heads) through
  `AdaptedModel.save_pretrained`; checkpoints keep VB-LoRA's logits, so resuming is exact;
- `resume_from_checkpoint` and `load_best_model_at_end` load that folder into the live model;
- label names come from the wrapped model's class, as for a plain transformers model.

Use `unilora.Trainer` in place of `transformers.Trainer`, and `adapter_trainer(SFTTrainer)` for
TRL (or any other Trainer subclass).
"""

from __future__ import annotations

import os

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import can_return_loss, find_labels

from ..core.errors import UniLoraError
from .model import AdaptedModel


def _adapted(model) -> AdaptedModel:
    while not isinstance(model, AdaptedModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise UniLoraError("this Trainer is for models returned by unilora.get_model / unilora.from_pretrained")
        model = inner
    return model


class AdapterTrainerMixin:
    """Put before a Trainer class: `class MyTrainer(AdapterTrainerMixin, transformers.Trainer)`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base_class = type(_adapted(self.model).get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class) or ["labels"]
        self.can_return_loss = can_return_loss(base_class)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        checkpoint = os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR)
        _adapted(self.model).save_pretrained(output_dir, state_dict=state_dict, resumable=checkpoint)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        _adapted(model if model is not None else self.model).load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _adapted(self.model).load_adapter_weights(self.state.best_model_checkpoint)


def adapter_trainer(trainer_class: type) -> type:
    """`trainer_class` (transformers.Trainer or a subclass such as trl.SFTTrainer) saving and
    resuming unilora adapters."""
    return type(f"Adapter{trainer_class.__name__}", (AdapterTrainerMixin, trainer_class), {})


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """transformers.Trainer for unilora models (see the module docstring)."""
