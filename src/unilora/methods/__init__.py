"""Every method as a projection class, by name."""

from .base import Projection
from .fastfood import FastfoodProjection
from .lora import LoRAProjection
from .tied_lora import TiedLoRAProjection
from .unilora import UniLoRAProjection
from .vblora import VBLoRAProjection
from .vera import VeRAProjection

PROJECTIONS: dict[str, type[Projection]] = {
    cls.method: cls
    for cls in (LoRAProjection, VeRAProjection, TiedLoRAProjection, VBLoRAProjection, UniLoRAProjection, FastfoodProjection)
}

__all__ = ["PROJECTIONS", "Projection"]
