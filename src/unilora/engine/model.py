"""AdaptedModel: a torch model with named adapters of any method, PEFT-like to use.

It keeps the books (which adapters, which one is active, their projections, layers and heads) and
offers PEFT's API over them. The work is done elsewhere: injection.py puts adapters into the
wrapped model and takes them out, routing.py says which adapter runs where, layers.py computes,
store/ writes and reads the adapter folders, hf_compat.py is what transformers and TRL expect,
merging.py forms s·B A into the weights or beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.layout import Layout, Slot
from ..core.targeting import base_module, base_weights, find_targets, is_conv1d, linear_shape, resolved_targets
from ..methods import Projection, build_projection
from ..store.adapter_file import adapter_metadata, adapter_tensors, from_state_dict, load_into, require_same_config
from ..store.io import AdapterFile, read_adapter, write_adapter_dir
from ..store.remote import open_adapter
from .binder import FactorBinder
from .hf_compat import TransformersCompat, input_embeddings
from .injection import check_targets_exist, inject_layers, remove_adapter, wrap_heads
from .layers import AdaptedLayer
from .merging import Merging
from .routing import AdapterRouter

DEFAULT_ADAPTER = "default"


@dataclasses.dataclass
class _Adapter:
    """What the model keeps for one named adapter (its projection lives in `model.projections`)."""

    config: AdapterConfig
    layout: Layout
    binder: FactorBinder
    layers: list[AdaptedLayer]  # in slot order
    head_modules: list[str]
    trainable: bool = True


class AdaptedModel(Merging, TransformersCompat, nn.Module):
    """Wraps `base_model`: freezes it, swaps target layers for AdaptedLayer, owns the adapters.

    It holds one or more named adapters (PEFT's API: `add_adapter`, `load_adapter`,
    `set_adapter`, `delete_adapter`, `active_adapter`); each has its own projection, layout,
    method and heads. The active adapter is the one that runs, trains, merges and saves;
    `forward(..., adapter_names=[...])` runs a different adapter on each row."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, target_names: list[str] | None = None,
                 adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if isinstance(base_model, AdaptedModel) or any(isinstance(m, AdaptedLayer) for m in base_model.modules()):
            raise UniLoraError("this model already carries a unilora adapter; add more with model.add_adapter / "
                               "model.load_adapter, or call merge_and_unload() first")
        self.model = base_model  # `model.base_model` is the wrapped model's own (its backbone), as in transformers
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.projections = nn.ModuleDict()
        self.router = AdapterRouter()
        self._adapters: dict[str, _Adapter] = {}
        self._warned_inexact_unmerge = False
        # One reconstruction per root forward. Both roots: calls of the wrapped model (generate) and
        # of this wrapper whose forward was replaced (TRL's fused LM head calls the backbone
        # directly) each open one forward.
        self._hooks = self.router.hook_into((base_model, self), input_embeddings(base_model))
        self.add_adapter(adapter_name, config, target_names=target_names)

    # --- the active adapter (what a single-adapter model had) -------------------------
    @property
    def active_adapter(self) -> str:
        return self.router.active

    @property
    def active_adapters(self) -> list[str]:
        return [self.router.active]

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this model holds, in the order they were added."""
        return list(self._adapters)

    @property
    def adapter_configs(self) -> dict[str, AdapterConfig]:
        return {name: adapter.config for name, adapter in self._adapters.items()}

    @property
    def _active(self) -> _Adapter:
        return self._adapters[self.router.active]

    @property
    def projection(self) -> Projection:
        return self.projections[self.router.active]

    @property
    def adapter_config(self) -> AdapterConfig:  # `model.config` stays the wrapped model's (Trainer and TRL read it)
        return self._active.config

    @property
    def layout(self) -> Layout:
        return self._active.layout

    @property
    def binder(self) -> FactorBinder:
        return self._active.binder

    @property
    def head_modules(self) -> list[str]:
        return list(self._active.head_modules)

    # --- adding and removing adapters -------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig, target_names: list[str] | None = None) -> None:
        """Attach a fresh adapter named `adapter_name` (not made active: see set_adapter). Its
        method, targets and heads may differ from the other adapters'."""
        self.router.check_new_name(adapter_name)
        if self.merged:
            raise UniLoraError("an adapter is merged into the weights; call unmerge() before adding another")
        names = target_names or find_targets(self.model, config.target_modules, exclude=config.modules_to_save)
        if isinstance(config.target_modules, str):  # saved as the layers it chose, as PEFT does
            resolved = resolved_targets(self.model, names, exclude=config.modules_to_save)
            config = config.replace(target_modules=resolved)
        layout = Layout([Slot(n, *linear_shape(base_module(self.model, n)), config.rank) for n in names])
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        weights = None if device.type == "meta" else (lambda: base_weights(self.model, names))
        projection = build_projection(config, layout, weights)
        config = projection.config  # with what the method chose from the layout (VB-LoRA's b)
        self.projections[adapter_name] = projection if device.type == "meta" else projection.to(device)
        self.projections[adapter_name].share_fixed_parts_with(self.projections.values())
        binder = FactorBinder(self.projections[adapter_name])
        layers = inject_layers(self.model, names, self.router, adapter_name, config, binder)
        self._adapters[adapter_name] = _Adapter(config, layout, binder, layers, [])
        self.router.add(adapter_name, binder)
        self._adapters[adapter_name].head_modules = wrap_heads(self.model, config.modules_to_save, self.router,
                                                               adapter_name)
        if adapter_name != self.router.active:
            self._set_trainable(adapter_name, False)

    def _head(self, name: str, adapter_name: str | None = None) -> nn.Module:
        """Adapter `adapter_name`'s (default: the active one's) trained copy of head `name`."""
        return self.model.get_submodule(name).copies[adapter_name or self.router.active]

    def _head_parameters(self, adapter_name: str | None = None) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(head module, parameter name in it, parameter) of every trained head of an adapter."""
        name = adapter_name or self.router.active
        for module in self._adapters[name].head_modules:
            for param_name, param in self._head(module, name).named_parameters():
                yield module, param_name, param

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that runs, trains, merges and saves. Only it is
        trainable (if it was added or loaded trainable); the others stay as they are."""
        self._require(adapter_name)
        if self.merged and adapter_name != self.router.active:
            raise UniLoraError(f"adapter '{self.router.active}' is merged into the weights; call unmerge() before "
                               f"set_adapter('{adapter_name}')")
        for name in self._adapters:
            self._set_trainable(name, name == adapter_name and self._adapters[name].trainable)
        self.router.active = adapter_name

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        self.projections[adapter_name].requires_grad_(trainable)
        for param in self.head_parameters(adapter_name).values():
            param.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its layers' entries and its heads. Deleting the active adapter
        makes the first remaining one active; the last adapter cannot be deleted."""
        self._require(adapter_name)
        if len(self._adapters) == 1:
            raise UniLoraError(f"'{adapter_name}' is this model's only adapter; use merge_and_unload() or "
                               "get_base_model() to drop it")
        if any(layer.merged_adapter == adapter_name for layer in self._adapters[adapter_name].layers):
            raise UniLoraError(f"adapter '{adapter_name}' is merged into the weights; call unmerge() first")
        adapter = self._adapters.pop(adapter_name)
        remove_adapter(self.model, adapter_name, adapter.layers, adapter.layout, adapter.head_modules)
        del self.projections[adapter_name]
        self.router.remove(adapter_name)
        if self.router.active == adapter_name:
            self.set_adapter(next(iter(self._adapters)))

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self._adapters:
            raise UniLoraError(f"no adapter named {adapter_name!r}; this model holds {self.adapters}")

    # --- running --------------------------------------------------------------------
    def mixed_rows(self, adapter_names) -> contextlib.AbstractContextManager:
        """The forwards inside run adapter `adapter_names[i]` ("__base__": none) on row i."""
        return self.router.mixed_rows(adapter_names, training=self.training, merged=self.merged)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (original heads included)."""
        if self.merged:
            raise UniLoraError("the adapter is merged into the weights; call unmerge() before disable_adapter()")
        self.router.enabled = False
        try:
            yield
        finally:
            self.router.enabled = True

    # --- training -------------------------------------------------------------------
    def head_parameters(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """Adapter `adapter_name`'s (default: the active one's) trained head parameters, by name."""
        return {f"{m}.{n}": p for m, n, p in self._head_parameters(adapter_name)}

    def parameter_groups(self, lr: float, group_lrs: dict[str, float] | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer param groups of the active adapter: the method's own (e.g. bank, logits,
        theta) plus "head". `group_lrs` overrides the learning rate of the groups it names."""
        group_lrs = dict(group_lrs or {})
        groups = dict(self.projection.param_groups())
        if self.head_modules:
            groups["head"] = list(self.head_parameters().values())
        unknown = sorted(set(group_lrs) - set(groups))
        if unknown:
            raise UniLoraError(f"learning rates given for unknown groups {unknown}; this adapter has {sorted(groups)}")
        return [
            {"name": name, "params": [p for p in params if p.requires_grad], "lr": group_lrs.get(name, lr), "weight_decay": weight_decay}
            for name, params in groups.items()
            if any(p.requires_grad for p in params)
        ]

    # --- counting -------------------------------------------------------------------
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def stored_param_count(self) -> int:
        """Float32-equivalent parameters the adapter stores, head excluded (seed 003 §3.4)."""
        return self.projection.stored_param_count()

    def stored_bytes(self, include_head: bool = False) -> int:
        tensors = self.adapter_tensors() if include_head else self.projection.stored_tensors()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        trainable = self.trainable_parameter_count()
        head = sum(p.numel() for p in self.head_parameters().values())
        print(
            f"trainable params: {trainable:,} (adapter {trainable - head:,} + head {head:,}) || all params: {total:,} "
            f"|| trainable%: {100 * trainable / max(total, 1):.4f} || stored: {self.stored_param_count():,} params, "
            f"{self.stored_bytes():,} bytes (+ head {self.stored_bytes(True) - self.stored_bytes():,} bytes)"
        )

    # --- saving and loading (store/ does the work) ----------------------------------------
    def adapter_tensors(self, state_dict: dict[str, torch.Tensor] | None = None,
                        store: str | None = None, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds (default: the active adapter's), from the live model
        or from a full `state_dict` of it (what transformers.Trainer passes when parameters are
        sharded). `store` overrides VB-LoRA's config.store."""
        name = adapter_name or self.router.active
        self._require(name)
        projection, heads = self.projections[name], self.head_parameters(name)
        if state_dict is not None:  # keys as this model names them: its heads' copies, its projections
            head_keys = {f"{m}.{n}": f"model.{m}.copies.{name}.{n}" for m, n, _ in self._head_parameters(name)}
            projection, heads = from_state_dict(state_dict, projection, f"projections.{name}.", head_keys)
        return adapter_tensors(projection, heads, store)

    def adapter_metadata(self, config: AdapterConfig | None = None, adapter_name: str | None = None) -> dict:
        name = adapter_name or self.router.active
        adapter = self._adapters[name]
        base_config = getattr(self.model, "config", None)
        return adapter_metadata(
            config or adapter.config, adapter.layout, self.projections[name],
            head_modules=adapter.head_modules,
            # GPT-2 style Conv1D layers store weights as (in, out): exporters need to know
            fan_in_fan_out=any(is_conv1d(layer.base_layer) for layer in adapter.layers),
            base_model={"class": type(self.model).__name__,
                        "name_or_path": getattr(base_config, "_name_or_path", None) or None},
        )

    def save_pretrained(self, directory: str | os.PathLike, task: dict | None = None, *,
                        state_dict: dict | None = None, is_main_process: bool = True, overwrite: bool = True,
                        resumable: bool = False, safe_serialization: bool = True, adapter_name: str | None = None,
                        **kwargs) -> None:
        """Write the adapter directory of `adapter_name` (default: the active adapter):
        adapter_config.json + adapter_model.safetensors (the adapter and its trained heads only).
        `task` (JSON-able) is kept beside it, e.g. label names.

        Replaces a previous adapter there (overwrite=False refuses instead) and keeps any other
        file in the folder; never replaces a file unilora did not write. Accepts the keywords that
        transformers and PEFT pass (`state_dict`, `is_main_process`, `safe_serialization`: adapters
        are always safetensors). `resumable=True` keeps VB-LoRA's logits (config store="logits"),
        so training resumes exactly; what a training checkpoint should hold."""
        if kwargs.get("push_to_hub"):
            raise UniLoraError("save_pretrained(push_to_hub=True) is not supported; save locally, then upload the folder")
        if not is_main_process:
            return
        name = adapter_name or self.router.active
        self._require(name)
        config = self._adapters[name].config
        if resumable and config.method == "vblora":
            config = config.replace(store="logits")
        metadata = self.adapter_metadata(config, name)
        if task is not None:
            metadata["task"] = task
        tensors = self.adapter_tensors(state_dict, store=getattr(config, "store", None), adapter_name=name)
        write_adapter_dir(directory, metadata, tensors, overwrite=overwrite)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load a saved adapter of the active adapter's configuration into it, in place (what
        resuming from a checkpoint does). VB-LoRA adapters may differ in `store`."""
        adapter = read_adapter(directory)
        require_same_config(adapter, self.adapter_config)
        self._load_into(adapter, self.router.active)

    def _load_into(self, adapter: AdapterFile, adapter_name: str) -> None:
        own = self._adapters[adapter_name]
        load_into(adapter, own.layout, self.projections[adapter_name], self.head_parameters(adapter_name))
        own.binder.invalidate()

    def load_adapter(self, directory: str | os.PathLike | AdapterFile, adapter_name: str,
                     is_trainable: bool = False) -> None:
        """Load a saved adapter beside the ones this model holds, under `adapter_name` (not made
        active: see set_adapter). Validated in full before anything is attached."""
        self.router.check_new_name(adapter_name)
        adapter = directory if isinstance(directory, AdapterFile) else open_adapter(directory)
        check_targets_exist(self.model, adapter.layout)
        self.add_adapter(adapter_name, adapter.config, target_names=[s.name for s in adapter.layout.slots])
        try:
            self._load_into(adapter, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._adapters[adapter_name].trainable = is_trainable
        self._set_trainable(adapter_name, is_trainable and adapter_name == self.router.active)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike | AdapterFile,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "AdaptedModel":
        """Load a saved adapter (a folder, or an fsspec URL read through a verified local cache) onto
        `base_model` (the same architecture it was trained on).
        Everything in the folder is validated before the adapter is built (see store/io.py); an
        `AdapterFile` already read with `read_adapter` is taken as is."""
        adapter = directory if isinstance(directory, AdapterFile) else open_adapter(directory)
        check_targets_exist(base_model, adapter.layout)
        model = cls(base_model, adapter.config, target_names=[s.name for s in adapter.layout.slots],
                    adapter_name=adapter_name)
        model._load_into(adapter, adapter_name)
        model._adapters[adapter_name].trainable = is_trainable
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER) -> AdaptedModel:
    """Attach a fresh adapter described by `config` to `model` (which is frozen in place)."""
    return AdaptedModel(model, config, adapter_name=adapter_name)
