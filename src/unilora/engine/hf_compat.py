"""What transformers and TRL expect of a model, for a wrapper around one (AdaptedModel).

- `model.forward` reports the wrapped model's signature: transformers.Trainer keeps only the
  dataset columns that the forward names, and finds the label names on the class's forward
  (which names `labels`).
- `generate`, and any attribute the wrapper lacks (`config`, `base_model`,
  `gradient_checkpointing_enable`, ...), reach the wrapped model.
- `input_embeddings` finds the module the binder ties a training pass's reconstruction to.
"""

from __future__ import annotations

import inspect

from torch import nn


def _adapted_forward(self, *args, labels=None, adapter_names=None, **kwargs):
    """Run the wrapped model. `labels` is named so that transformers finds the label column;
    `adapter_names` (one per row) runs a mixed-adapter batch."""
    if labels is not None:
        kwargs["labels"] = labels
    if adapter_names is None:
        return self.model(*args, **kwargs)
    with self.mixed_rows(adapter_names):
        return self.model(*args, **kwargs)


class _ForwardWithBaseSignature:
    """Class attribute `forward`: the plain function on the class (its signature names
    `labels`), a callable with the wrapped model's signature on an instance."""

    def __get__(self, model, owner=None):
        return _adapted_forward if model is None else _BoundForward(model)


class _BoundForward:
    """`model.forward` of one wrapper: calls it, and reports the wrapped model's signature."""

    __slots__ = ("__self__",)

    def __init__(self, model):
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return _adapted_forward(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__self__.model.forward)


class TransformersCompat:
    """Mixin for an nn.Module that wraps a transformers model as `self.model` and runs a batch with
    one adapter per row inside `self.mixed_rows(adapter_names)`."""

    forward = _ForwardWithBaseSignature()

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's generate; `adapter_names` (one per input row) for a mixed batch."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name)."""
        return self.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "projections", "router"):
                raise
            return getattr(self.model, name)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The module that embeds input tokens (where the binder ties the reconstruction's gradient)."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(found, nn.Module):
                return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
