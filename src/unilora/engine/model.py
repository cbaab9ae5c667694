"""AdaptedModel: a torch model with named adapters of any method, PEFT-like to use."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import warnings
from typing import Iterator

import torch
from torch import nn

from .binder import FactorBinder
from ..core.config import AdapterConfig
from ..core.errors import LayoutMismatchError, UniLoraError
from ..store.io import FORMAT_VERSION, HEAD_PREFIX, AdapterFile, read_adapter, write_adapter_dir
from .layers import AdaptedLayer, LayerAdapter, SavedHead
from ..core.layout import Layout, Slot
from ..methods import PROJECTIONS, Projection
from ..methods.vblora import with_vector_length
from .routing import BASE, AdapterRouter
from ..core.targeting import base_module, find_targets, is_adaptable, is_conv1d, linear_shape, name_matches

DEFAULT_ADAPTER = "default"


def _version() -> str:
    from .. import __version__

    return __version__


def _adapted_forward(self: "AdaptedModel", *args, labels=None, adapter_names=None, **kwargs):
    """Run the wrapped model. `labels` is named so that transformers finds the label column;
    `adapter_names` (one per row) runs a mixed-adapter batch."""
    if labels is not None:
        kwargs["labels"] = labels
    if adapter_names is None:
        return self.model(*args, **kwargs)
    with self._rows(adapter_names):
        return self.model(*args, **kwargs)


class _ForwardWithBaseSignature:
    """Class attribute `forward`: the plain function on the class (its signature names
    `labels`), a callable with the wrapped model's signature on an instance."""

    def __get__(self, model, owner=None):
        return _adapted_forward if model is None else _BoundForward(model)


@dataclasses.dataclass
class _Adapter:
    """What the model keeps for one named adapter (its projection lives in `model.projections`)."""

    config: AdapterConfig
    layout: Layout
    binder: FactorBinder
    layers: list[AdaptedLayer]  # in slot order
    head_modules: list[str]
    trainable: bool = True


class AdaptedModel(nn.Module):
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
        # One reconstruction per root forward (bound methods, not lambdas: copies and pickles
        # of the model must drive their own router).
        # Both roots: calls of the wrapped model (generate) and of this wrapper whose forward was
        # replaced (TRL's fused LM head calls the backbone directly) each open one forward.
        self._hooks = [
            hook
            for root in (base_model, self)
            for hook in (root.register_forward_pre_hook(self.router.begin_forward, with_kwargs=True),
                         root.register_forward_hook(self.router.end_forward, always_call=True))
        ]
        embeddings = input_embeddings(base_model)
        if embeddings is not None:
            self._hooks.append(embeddings.register_forward_hook(self.router.tie_hook))
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

    @property
    def _layers(self) -> list[AdaptedLayer]:
        return self._active.layers

    # --- adding and removing adapters -------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig, target_names: list[str] | None = None) -> None:
        """Attach a fresh adapter named `adapter_name` (not made active: see set_adapter). Its
        method, targets and heads may differ from the other adapters'."""
        self._check_new_name(adapter_name)
        if self.merged:
            raise UniLoraError("an adapter is merged into the weights; call unmerge() before adding another")
        names = target_names or find_targets(self.model, config.target_modules, exclude=config.modules_to_save)
        layout = Layout([Slot(n, *linear_shape(base_module(self.model, n)), config.rank) for n in names])
        config = with_vector_length(config, layout)
        projection = PROJECTIONS[config.method](layout, config)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.projections[adapter_name] = projection if device.type == "meta" else projection.to(device)
        self._share_fixed_parts(adapter_name)
        binder = FactorBinder(self.projections[adapter_name])
        layers = []
        for slot_index, name in enumerate(names):
            layer = self.model.get_submodule(name)
            if not isinstance(layer, AdaptedLayer):
                parent_name, _, child = name.rpartition(".")
                layer = AdaptedLayer(layer, self.router)
                setattr(self.model.get_submodule(parent_name), child, layer)
            layer.add(adapter_name, LayerAdapter(slot_index, config.scaling, config.dropout, binder))
            layers.append(layer)
        self._adapters[adapter_name] = _Adapter(config, layout, binder, layers, [])
        self.router.add(adapter_name, binder)
        self._adapters[adapter_name].head_modules = self._wrap_heads(adapter_name, config.modules_to_save)
        if adapter_name != self.router.active:
            self._set_trainable(adapter_name, False)

    def _share_fixed_parts(self, adapter_name: str) -> None:
        """Moved to a device, projections of one seeded draw would each hold a copy of it: point
        the new one's fixed buffers at an existing adapter's copy (same draw, device, dtype)."""
        projection = self.projections[adapter_name]
        fixed = getattr(projection, "fixed", None)
        other = next((p for n, p in self.projections.items()
                      if n != adapter_name and fixed is not None and getattr(p, "fixed", None) is fixed), None)
        if other is None:
            return
        for name, buffer in other.named_buffers(recurse=False):
            mine = projection._buffers.get(name)
            if mine is not None and mine.device == buffer.device and mine.dtype == buffer.dtype:
                projection._buffers[name] = buffer

    def _check_new_name(self, name) -> None:
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise UniLoraError(f"adapter name {name!r} is not allowed: use a non-empty name without '.', other than '{BASE}'")
        if name in self._adapters:
            raise UniLoraError(f"this model already holds an adapter named '{name}'; delete_adapter('{name}') first "
                               "or choose another name")

    def _wrap_heads(self, adapter_name: str, names: list[str]) -> list[str]:
        if not names:
            return []
        found = [n for n, _ in self.model.named_modules()
                 if n and name_matches(n, names) and ".original" not in n and ".copies." not in n]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found)]  # outermost only
        if not found:
            raise UniLoraError(f"modules_to_save {names} matched no module of the model")
        for n in found:
            module = self.model.get_submodule(n)
            if isinstance(module, AdaptedLayer):
                raise UniLoraError(f"modules_to_save names '{n}', which another adapter adapts; train it in full "
                                   "in a model of its own, or leave it out of modules_to_save")
            if not isinstance(module, SavedHead):
                parent_name, _, child = n.rpartition(".")
                module = SavedHead(module, self.router)
                setattr(self.model.get_submodule(parent_name), child, module)
            module.add(adapter_name)
        return found

    def _head(self, name: str, adapter_name: str | None = None) -> nn.Module:
        """Adapter `adapter_name`'s (default: the active one's) trained copy of head `name`."""
        return self.model.get_submodule(name).copies[adapter_name or self.router.active]

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
        for m in self._adapters[adapter_name].head_modules:
            self._head(m, adapter_name).requires_grad_(trainable)

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
        for layer, slot in zip(adapter.layers, adapter.layout.slots):
            layer.remove(adapter_name)
            if not layer.adapters:  # no adapter left here: the model's own layer goes back
                parent_name, _, child = slot.name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, layer.base_layer)
        for name in adapter.head_modules:
            head = self.model.get_submodule(name)
            head.remove(adapter_name)
            if not len(head.copies):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, head.original)
        del self.projections[adapter_name]
        self.router.remove(adapter_name)
        if self.router.active == adapter_name:
            self.set_adapter(next(iter(self._adapters)))

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self._adapters:
            raise UniLoraError(f"no adapter named {adapter_name!r}; this model holds {self.adapters}")

    # --- running --------------------------------------------------------------------
    # `model.forward` reports the wrapped model's signature: transformers.Trainer keeps only the
    # dataset columns that the forward names, and finds label names on the class's `labels`.
    forward = _ForwardWithBaseSignature()

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's generate; `adapter_names` (one per input row) for a mixed batch."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names) -> Iterator[None]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise UniLoraError("adapter_names must be a list of adapter names, one per row of the batch")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self._adapters})
        if unknown:
            raise UniLoraError(f"adapter_names names {unknown}, which this model does not hold ({self.adapters}; "
                               f"'{BASE}' for the base model)")
        if not adapter_names:
            raise UniLoraError("adapter_names is empty; give one adapter name per row of the batch")
        if self.training:
            raise UniLoraError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        if self.merged:
            raise UniLoraError("adapter_names cannot run while an adapter is merged into the weights; call unmerge() first")
        with self.router.mixed_rows(list(adapter_names)):
            yield

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "projections", "router"):
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name)."""
        return self.model

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

    # --- merging --------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for adapter in self._adapters.values() for layer in adapter.layers)

    def merge(self) -> None:
        """Add s·B A of the active adapter into every weight it adapts: zero inference overhead
        until unmerge().

        Stochastic VB-LoRA selections merge their deterministic (stored, eval) selection."""
        factors = self.projection.eval_factors()
        for slot, layer in enumerate(self._layers):
            layer.merge(factors[slot], self.router.active)
        self.binder.invalidate()

    def unmerge(self) -> None:
        factors = self.projection.eval_factors()
        exact = all([layer.unmerge(factors[slot]) for slot, layer in enumerate(self._layers)])
        if not exact and not self._warned_inexact_unmerge:
            self._warned_inexact_unmerge = True
            warnings.warn(
                "unmerge() on bfloat16/float16 weights cannot restore them exactly (W + ΔW was rounded when "
                "merged); keep the base weights, or reload the base model, where exact weights matter",
                stacklevel=2,
            )

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter, put the original layer objects back, and return the plain
        base model (with the active adapter's trained heads). Other adapters are dropped."""
        self.merge()
        active = self.router.active
        for adapter in self._adapters.values():
            for layer, slot in zip(adapter.layers, adapter.layout.slots):
                parent_name, _, child = slot.name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, layer.base_layer)
            for name in adapter.head_modules:
                parent_name, _, child = name.rpartition(".")
                head = self.model.get_submodule(name)
                if isinstance(head, SavedHead):
                    setattr(self.model.get_submodule(parent_name), child,
                            head.copies[active] if active in head.copies else head.original)
        self._adapters = {active: dataclasses.replace(self._active, layers=[], head_modules=[])}
        for name in [n for n in self.projections if n != active]:
            del self.projections[name]
            self.router.remove(name)
        for hook in self._hooks:  # the plain model must not pay for (or reach) the projection
            hook.remove()
        self._hooks = []
        return self.model

    # --- training -------------------------------------------------------------------
    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{m}.{n}": p for m in self.head_modules for n, p in self._head(m).named_parameters()}

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

    # --- saving and loading ---------------------------------------------------------
    def adapter_tensors(self, state_dict: dict[str, torch.Tensor] | None = None,
                        store: str | None = None, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds (default: the active adapter's), from the live model
        or from a full `state_dict` of it (what transformers.Trainer passes when parameters are
        sharded). `store` overrides VB-LoRA's config.store."""
        name = adapter_name or self.router.active
        self._require(name)
        if state_dict is not None:
            projection, heads = self._from_state_dict(state_dict, name)
        else:
            projection = self.projections[name]
            heads = {f"{m}.{n}": p for m in self._adapters[name].head_modules
                     for n, p in self._head(m, name).named_parameters()}
        tensors = dict(projection.stored_tensors(store=store))
        tensors.update({HEAD_PREFIX + n: p.detach() for n, p in heads.items()})
        return tensors

    def _from_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str):
        prefix = f"projections.{adapter_name}."
        own = self.projections[adapter_name]
        names = [prefix + k for k in own.state_dict()]
        strip = next((p for p in ("", "module.", "_orig_mod.") if all(p + k in state_dict for k in names)), None)
        if strip is None:
            raise UniLoraError("the state_dict passed to save_pretrained lacks this adapter's projection tensors")
        projection = copy.deepcopy(own)  # small: θ and its fixed parts
        projection.load_state_dict({k[len(prefix):]: state_dict[strip + k] for k in names})
        heads = {}
        for m in self._adapters[adapter_name].head_modules:
            for n in dict(self._head(m, adapter_name).named_parameters()):
                key = f"{strip}model.{m}.copies.{adapter_name}.{n}"
                if key not in state_dict:
                    raise UniLoraError(f"the state_dict passed to save_pretrained lacks the head tensor '{key}'")
                heads[f"{m}.{n}"] = state_dict[key]
        return projection, heads

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
            config = dataclasses.replace(config, store="logits")
        metadata = self.adapter_metadata(config, name)
        if task is not None:
            metadata["task"] = task
        tensors = self.adapter_tensors(state_dict, store=config.store, adapter_name=name)
        write_adapter_dir(directory, metadata, tensors, overwrite=overwrite)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load a saved adapter of the active adapter's configuration into it, in place (what
        resuming from a checkpoint does). VB-LoRA adapters may differ in `store`."""
        adapter = read_adapter(directory)
        mine, theirs = self.adapter_config.to_dict(), adapter.config.to_dict()
        mine.pop("store"), theirs.pop("store")
        if mine != theirs:
            changed = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise UniLoraError(f"'{directory}' holds an adapter configured differently from this model's ({changed}); "
                               "load it with unilora.from_pretrained or model.load_adapter instead")
        self._load_adapter(adapter, self.router.active)

    def _load_adapter(self, adapter: AdapterFile, adapter_name: str) -> None:
        """Put a validated adapter's tensors into adapter `adapter_name`, whose layout and seeded
        draw must match."""
        own, projection = self._adapters[adapter_name], self.projections[adapter_name]
        own.layout.require_same(adapter.layout)
        projection.check_metadata(adapter.meta.get("projection", {}))
        params = {f"{m}.{n}": p for m in own.head_modules for n, p in self._head(m, adapter_name).named_parameters()}
        missing, unexpected = sorted(set(params) - set(adapter.head)), sorted(set(adapter.head) - set(params))
        if missing or unexpected:
            raise UniLoraError(
                f"adapter head tensors do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); load it onto the model class it was trained with"
            )
        projection.load_stored_tensors(adapter.tensors)
        for name, value in adapter.head.items():
            projection._copy_into(params[name], value, HEAD_PREFIX + name)
        own.binder.invalidate()

    def load_adapter(self, directory: str | os.PathLike | AdapterFile, adapter_name: str,
                     is_trainable: bool = False) -> None:
        """Load a saved adapter beside the ones this model holds, under `adapter_name` (not made
        active: see set_adapter). Validated in full before anything is attached."""
        self._check_new_name(adapter_name)
        adapter = directory if isinstance(directory, AdapterFile) else read_adapter(directory)
        _check_targets_exist(self.model, adapter.layout)
        self.add_adapter(adapter_name, adapter.config, target_names=[s.name for s in adapter.layout.slots])
        try:
            self._load_adapter(adapter, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._adapters[adapter_name].trainable = is_trainable
        self._set_trainable(adapter_name, is_trainable and adapter_name == self.router.active)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike | AdapterFile,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "AdaptedModel":
        """Load a saved adapter onto `base_model` (the same architecture it was trained on).
        Everything in the folder is validated before the adapter is built (see io.py); an
        `AdapterFile` already read with `io.read_adapter` is taken as is."""
        adapter = directory if isinstance(directory, AdapterFile) else read_adapter(directory)
        _check_targets_exist(base_model, adapter.layout)
        model = cls(base_model, adapter.config, target_names=[s.name for s in adapter.layout.slots],
                    adapter_name=adapter_name)
        model._load_adapter(adapter, adapter_name)
        model._adapters[adapter_name].trainable = is_trainable
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model


class _BoundForward:
    """`model.forward` of one AdaptedModel: calls it, and reports the wrapped model's signature."""

    __slots__ = ("__self__",)

    def __init__(self, model: "AdaptedModel"):
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return _adapted_forward(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__self__.model.forward)


def _check_targets_exist(base_model: nn.Module, layout: Layout) -> None:
    modules = dict(base_model.named_modules())
    for slot in layout.slots:
        module = modules.get(slot.name)
        if getattr(module, "wraps_base_layer", False):  # a layer that already carries other adapters
            module = module.base_layer
        if module is None or not is_adaptable(module):
            raise LayoutMismatchError(
                f"adapter does not fit this model: it adapts layer '{slot.name}', which this model "
                f"{'lacks' if module is None else 'has, but not as a linear layer'}; load it onto the base "
                "model architecture it was trained on"
            )
        if linear_shape(module) != (slot.in_features, slot.out_features):
            n_in, n_out = linear_shape(module)
            raise LayoutMismatchError(
                f"adapter does not fit this model: layer '{slot.name}' is {n_out}x{n_in} here but "
                f"{slot.out_features}x{slot.in_features} in the adapter; use the base model it was trained on"
            )


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


def adapter_metadata(config: AdapterConfig, layout: Layout, projection, head_modules=(), fan_in_fan_out=False,
                     base_model=None, **extra) -> dict:
    """The adapter_config.json of an adapter: everything needed to rebuild its projection."""
    return {
        "format": "unilora",
        "format_version": FORMAT_VERSION,
        "unilora_version": _version(),
        "adapter": config.to_dict(),
        "layout": layout.to_json(),
        "layout_fingerprint": layout.fingerprint(),
        "D": layout.D,
        "projection": projection.metadata(),
        "head_modules": list(head_modules),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "stored_params": projection.stored_param_count(),
        "base_model": base_model or {"class": None, "name_or_path": None},
        **extra,
    }


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER) -> AdaptedModel:
    """Attach a fresh adapter described by `config` to `model` (which is frozen in place)."""
    return AdaptedModel(model, config, adapter_name=adapter_name)
