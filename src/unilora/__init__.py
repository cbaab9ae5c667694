"""unilora: extreme parameter-efficient fine-tuning, every LoRA variant as a projection θ_D = P θ_d."""

__version__ = "0.1.0"

from .core.config import METHODS, AdapterConfig
from .core.errors import LayoutMismatchError, UniLoraError
from .engine.model import AdaptedModel, get_model

from_pretrained = AdaptedModel.from_pretrained

_INTEGRATIONS = ("Trainer", "AdapterTrainerMixin", "adapter_trainer")


def __getattr__(name: str):
    # transformers.Trainer is heavy to import: load the integration only when asked for
    if name in _INTEGRATIONS:
        from .engine import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'unilora' has no attribute '{name}'")


__all__ = [
    *_INTEGRATIONS,
    "AdapterConfig",
    "AdaptedModel",
    "LayoutMismatchError",
    "METHODS",
    "UniLoraError",
    "from_pretrained",
    "get_model",
]
