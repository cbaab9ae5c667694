"""unilora: extreme parameter-efficient fine-tuning, every LoRA variant as a projection θ_D = P θ_d."""

__version__ = "0.1.0"

from .config import METHODS, AdapterConfig
from .errors import LayoutMismatchError, UniLoraError
from .model import AdaptedModel, get_model

from_pretrained = AdaptedModel.from_pretrained

__all__ = [
    "AdapterConfig",
    "AdaptedModel",
    "LayoutMismatchError",
    "METHODS",
    "UniLoraError",
    "from_pretrained",
    "get_model",
]
