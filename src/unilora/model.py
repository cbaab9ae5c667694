"""AdaptedModel: a torch model with one adapter of any method, PEFT-like to use."""

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
from .config import AdapterConfig
from .errors import LayoutMismatchError, UniLoraError
from .io import FORMAT_VERSION, HEAD_PREFIX, AdapterFile, read_adapter, write_adapter_dir
from .layers import AdaptedLayer, SavedHead
from .layout import Layout, Slot
from .methods import PROJECTIONS
from .methods.vblora import with_vector_length
from .targeting import find_targets, is_adaptable, is_conv1d, linear_shape, name_matches


def _version() -> str:
    from . import __version__

    return __version__


def _adapted_forward(self: "AdaptedModel", *args, labels=None, **kwargs):
    """Run the wrapped model. `labels` is named so that transformers finds the label column."""
    if kwargs.pop("adapter_names", None) is not None:
        raise UniLoraError(
            "adapter_names: mixed-adapter batches are not supported; this model holds a single adapter, "
            "so run one batch per adapter (or load each adapter onto its own model)"
        )
    if labels is not None:
        kwargs["labels"] = labels
    return self.model(*args, **kwargs)


class _ForwardWithBaseSignature:
    """Class attribute `forward`: the plain function on the class (its signature names
    `labels`), a callable with the wrapped model's signature on an instance."""

    def __get__(self, model, owner=None):
        return _adapted_forward if model is None else _BoundForward(model)


class AdaptedModel(nn.Module):
    """Wraps `base_model`: freezes it, swaps target layers for AdaptedLayer, owns the projection."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, target_names: list[str] | None = None):
        super().__init__()
        if isinstance(base_model, AdaptedModel) or any(isinstance(m, AdaptedLayer) for m in base_model.modules()):
            raise UniLoraError("this model already carries a unilora adapter; call merge_and_unload() first")
        self.model = base_model  # `model.base_model` is the wrapped model's own (its backbone), as in transformers
        for param in base_model.parameters():
            param.requires_grad_(False)
        names = target_names or find_targets(base_model, config.target_modules, exclude=config.modules_to_save)
        self.layout = Layout([Slot(n, *linear_shape(base_model.get_submodule(n)), config.rank) for n in names])
        config = with_vector_length(config, self.layout)
        self.adapter_config = config  # `model.config` stays the wrapped model's (Trainer and TRL read it)
        projection = PROJECTIONS[config.method](self.layout, config)
        device = next((p.device for p in base_model.parameters()), torch.device("cpu"))
        self.projection = projection if device.type == "meta" else projection.to(device)
        self.binder = FactorBinder(self.projection)
        self._layers: list[AdaptedLayer] = []
        for slot_index, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name)
            layer = AdaptedLayer(getattr(parent, child), slot_index, config.scaling, config.dropout, self.binder)
            setattr(parent, child, layer)
            self._layers.append(layer)
        self.head_modules = self._wrap_heads(config.modules_to_save)
        self._warned_inexact_unmerge = False
        # One reconstruction per root forward (bound methods, not lambdas: copies and pickles
        # of the model must drive their own binder).
        # Both roots: calls of the wrapped model (generate) and of this wrapper whose forward was
        # replaced (TRL's fused LM head calls the backbone directly) each open one forward.
        self._hooks = [
            hook
            for root in (base_model, self)
            for hook in (root.register_forward_pre_hook(self.binder.begin_forward),
                         root.register_forward_hook(self.binder.end_forward, always_call=True))
        ]
        embeddings = input_embeddings(base_model)
        if embeddings is not None:
            self._hooks.append(embeddings.register_forward_hook(self.binder.tie_hook))

    def _wrap_heads(self, names: list[str]) -> list[str]:
        if not names:
            return []
        found = [n for n, _ in self.model.named_modules() if n and name_matches(n, names)]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found)]  # outermost only
        if not found:
            raise UniLoraError(f"modules_to_save {names} matched no module of the model")
        for n in found:
            parent_name, _, child = n.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            setattr(parent, child, SavedHead(getattr(parent, child), self.binder))
        return found

    def _head(self, name: str) -> nn.Module:
        """The trained copy of head `name`."""
        return self.model.get_submodule(name).trained

    # --- running --------------------------------------------------------------------
    # `model.forward` reports the wrapped model's signature: transformers.Trainer keeps only the
    # dataset columns that the forward names, and finds label names on the class's `labels`.
    forward = _ForwardWithBaseSignature()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "projection"):
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
        self.binder.enabled = False
        try:
            yield
        finally:
            self.binder.enabled = True

    # --- merging --------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self._layers)

    def merge(self) -> None:
        """Add s·B A into every adapted weight: zero inference overhead until unmerge().

        Stochastic VB-LoRA selections merge their deterministic (stored, eval) selection."""
        factors = self.projection.eval_factors()
        for layer in self._layers:
            layer.merge(factors[layer.slot])
        self.binder.invalidate()

    def unmerge(self) -> None:
        factors = self.projection.eval_factors()
        exact = all([layer.unmerge(factors[layer.slot]) for layer in self._layers])
        if not exact and not self._warned_inexact_unmerge:
            self._warned_inexact_unmerge = True
            warnings.warn(
                "unmerge() on bfloat16/float16 weights cannot restore them exactly (W + ΔW was rounded when "
                "merged); keep the base weights, or reload the base model, where exact weights matter",
                stacklevel=2,
            )

    def merge_and_unload(self) -> nn.Module:
        """Merge, put the original layer objects back, and return the plain base model (with the
        trained heads)."""
        self.merge()
        for layer, slot in zip(self._layers, self.layout.slots):
            parent_name, _, child = slot.name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base_layer)
        self._layers = []
        for name in self.head_modules:
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, self._head(name))
        self.head_modules = []
        for hook in self._hooks:  # the plain model must not pay for (or reach) the projection
            hook.remove()
        self._hooks = []
        return self.model

    # --- training -------------------------------------------------------------------
    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{m}.{n}": p for m in self.head_modules for n, p in self._head(m).named_parameters()}

    def parameter_groups(self, lr: float, group_lrs: dict[str, float] | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer param groups: the method's own (e.g. bank, logits, theta) plus "head".
        `group_lrs` overrides the learning rate of the groups it names."""
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
                        store: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds, from the live model or from a full `state_dict` of
        it (what transformers.Trainer passes when parameters are sharded). `store` overrides
        VB-LoRA's config.store."""
        projection, heads = self.projection, self.head_parameters()
        if state_dict is not None:
            projection, heads = self._from_state_dict(state_dict)
        tensors = dict(projection.stored_tensors(store=store))
        tensors.update({HEAD_PREFIX + n: p.detach() for n, p in heads.items()})
        return tensors

    def _from_state_dict(self, state_dict: dict[str, torch.Tensor]):
        names = [f"projection.{k}" for k in self.projection.state_dict()]
        strip = next((p for p in ("", "module.", "_orig_mod.") if all(p + k in state_dict for k in names)), None)
        if strip is None:
            raise UniLoraError("the state_dict passed to save_pretrained lacks this adapter's projection tensors")
        projection = copy.deepcopy(self.projection)  # small: θ and its fixed parts
        projection.load_state_dict({k[len("projection."):]: state_dict[strip + k] for k in names})
        heads = {}
        for m in self.head_modules:
            for n in dict(self._head(m).named_parameters()):
                key = f"{strip}model.{m}.trained.{n}"
                if key not in state_dict:
                    raise UniLoraError(f"the state_dict passed to save_pretrained lacks the head tensor '{key}'")
                heads[f"{m}.{n}"] = state_dict[key]
        return projection, heads

    def adapter_metadata(self, config: AdapterConfig | None = None) -> dict:
        base_config = getattr(self.model, "config", None)
        return adapter_metadata(
            config or self.adapter_config, self.layout, self.projection,
            head_modules=self.head_modules,
            # GPT-2 style Conv1D layers store weights as (in, out): exporters need to know
            fan_in_fan_out=any(is_conv1d(layer.base_layer) for layer in self._layers),
            base_model={"class": type(self.model).__name__,
                        "name_or_path": getattr(base_config, "_name_or_path", None) or None},
        )

    def save_pretrained(self, directory: str | os.PathLike, task: dict | None = None, *,
                        state_dict: dict | None = None, is_main_process: bool = True, overwrite: bool = True,
                        resumable: bool = False, safe_serialization: bool = True, **kwargs) -> None:
        """Write the adapter directory: adapter_config.json + adapter_model.safetensors (the
        adapter and trained heads only). `task` (JSON-able) is kept beside it, e.g. label names.

        Replaces a previous adapter there (overwrite=False refuses instead) and keeps any other
        file in the folder; never replaces a file unilora did not write. Accepts the keywords that
        transformers and PEFT pass (`state_dict`, `is_main_process`, `safe_serialization`: adapters
        are always safetensors). `resumable=True` keeps VB-LoRA's logits (config store="logits"),
        so training resumes exactly; what a training checkpoint should hold."""
        if kwargs.get("push_to_hub"):
            raise UniLoraError("save_pretrained(push_to_hub=True) is not supported; save locally, then upload the folder")
        if not is_main_process:
            return
        config = self.adapter_config
        if resumable and config.method == "vblora":
            config = dataclasses.replace(config, store="logits")
        metadata = self.adapter_metadata(config)
        if task is not None:
            metadata["task"] = task
        tensors = self.adapter_tensors(state_dict, store=config.store)
        write_adapter_dir(directory, metadata, tensors, overwrite=overwrite)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load a saved adapter of this same configuration into this model, in place (what
        resuming from a checkpoint does). VB-LoRA adapters may differ in `store`."""
        adapter = read_adapter(directory)
        mine, theirs = self.adapter_config.to_dict(), adapter.config.to_dict()
        mine.pop("store"), theirs.pop("store")
        if mine != theirs:
            changed = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise UniLoraError(f"'{directory}' holds an adapter configured differently from this model's ({changed}); "
                               "load it with unilora.from_pretrained instead")
        self._load_adapter(adapter)

    def _load_adapter(self, adapter: AdapterFile) -> None:
        """Put a validated adapter's tensors into this model, whose layout and seeded draw must match."""
        self.layout.require_same(adapter.layout)
        self.projection.check_metadata(adapter.meta.get("projection", {}))
        params = self.head_parameters()
        missing, unexpected = sorted(set(params) - set(adapter.head)), sorted(set(adapter.head) - set(params))
        if missing or unexpected:
            raise UniLoraError(
                f"adapter head tensors do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); load it onto the model class it was trained with"
            )
        self.projection.load_stored_tensors(adapter.tensors)
        for name, value in adapter.head.items():
            self.projection._copy_into(params[name], value, HEAD_PREFIX + name)
        self.binder.invalidate()

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike | AdapterFile,
                        is_trainable: bool = False) -> "AdaptedModel":
        """Load a saved adapter onto `base_model` (the same architecture it was trained on).
        Everything in the folder is validated before the adapter is built (see io.py); an
        `AdapterFile` already read with `io.read_adapter` is taken as is."""
        adapter = directory if isinstance(directory, AdapterFile) else read_adapter(directory)
        _check_targets_exist(base_model, adapter.layout)
        model = cls(base_model, adapter.config, target_names=[s.name for s in adapter.layout.slots])
        model._load_adapter(adapter)
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


def get_model(model: nn.Module, config: AdapterConfig) -> AdaptedModel:
    """Attach a fresh adapter described by `config` to `model` (which is frozen in place)."""
    return AdaptedModel(model, config)
