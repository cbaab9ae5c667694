"""unilora: extreme parameter-efficient fine-tuning, every LoRA variant as a projection θ_D = P θ_d.

The package is layered (docs/design.md): core, methods, data and store, engine and models, tools,
training, cli; this module gathers the public API.
"""

from ._version import __version__
from .core.config import AdapterConfig
from .core.errors import LayoutMismatchError, UniLoraError
from .core.registry import method_names
from .engine.distributed import fully_shard_adapted
from .engine.model import AdaptedModel, get_model
from .models.quantization import quantize_model

from_pretrained = AdaptedModel.from_pretrained

_INTEGRATIONS = ("Trainer", "AdapterTrainerMixin", "adapter_trainer")


def __getattr__(name: str):
    if name == "METHODS":  # read from the registry, so that a method registered later is listed too
        return method_names()
    # deferred: transformers.Trainer loads accelerate and more (seconds); the integration loads when asked for
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
    "__version__",
    "from_pretrained",
    "fully_shard_adapted",
    "get_model",
    "quantize_model",
]
