"""unilora: extreme parameter-efficient fine-tuning, every LoRA variant as a projection θ_D = P θ_d.

The package is layered (docs/design.md): core, methods, data and store, engine and models, tools,
training, cli; this module gathers the public API.

Each name loads its module when first asked for (PEP 562): `import unilora` itself costs nothing,
so the `unilora` command can set itself up (its SIGTERM handling) before torch and transformers
load, which takes seconds.
"""

import importlib

from ._version import __version__

# public name -> (module, attribute)
_PUBLIC = {
    "AdapterConfig": (".core.config", "AdapterConfig"),
    "LayoutMismatchError": (".core.errors", "LayoutMismatchError"),
    "UniLoraError": (".core.errors", "UniLoraError"),
    "fully_shard_adapted": (".engine.distributed", "fully_shard_adapted"),
    "AdaptedModel": (".engine.model", "AdaptedModel"),
    "get_model": (".engine.model", "get_model"),
    "quantize_model": (".models.quantization", "quantize_model"),
    # transformers.Trainer loads accelerate and more: the integration loads when asked for
    "Trainer": (".engine.integrations", "Trainer"),
    "AdapterTrainerMixin": (".engine.integrations", "AdapterTrainerMixin"),
    "adapter_trainer": (".engine.integrations", "adapter_trainer"),
}


def __getattr__(name: str):
    if name == "METHODS":  # read from the registry, so that a method registered later is listed too
        return importlib.import_module(".core.registry", __name__).method_names()
    if name == "from_pretrained":
        return importlib.import_module(".engine.model", __name__).AdaptedModel.from_pretrained
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        value = getattr(importlib.import_module(module, __name__), attribute)
        globals()[name] = value  # asked once
        return value
    raise AttributeError(f"module 'unilora' has no attribute '{name}'")


def __dir__() -> list[str]:  # tab completion and dir() list the public names before they are loaded
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterTrainerMixin",
    "LayoutMismatchError",
    "METHODS",
    "Trainer",
    "UniLoraError",
    "__version__",
    "adapter_trainer",
    "from_pretrained",
    "fully_shard_adapted",
    "get_model",
    "quantize_model",
]
