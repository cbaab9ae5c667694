"""AdaptedModel: a torch model with one adapter of any method, PEFT-like to use."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn

from .binder import FactorBinder
from .config import AdapterConfig
from .errors import LayoutMismatchError, UniLoraError
from .io import FORMAT_VERSION, read_adapter_dir, write_adapter_dir
from .layers import AdaptedLayer
from .layout import Layout, Slot
from .methods import PROJECTIONS
from .targeting import find_targets, is_adaptable, is_conv1d, linear_shape, name_matches

HEAD_PREFIX = "head."


def _version() -> str:
    from . import __version__

    return __version__


class AdaptedModel(nn.Module):
    """Wraps `base_model`: freezes it, swaps target layers for AdaptedLayer, owns the projection."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, target_names: list[str] | None = None):
        super().__init__()
        if isinstance(base_model, AdaptedModel) or any(isinstance(m, AdaptedLayer) for m in base_model.modules()):
            raise UniLoraError("this model already carries a unilora adapter; call merge_and_unload() first")
        self.config = config
        self.base_model = base_model
        for param in base_model.parameters():
            param.requires_grad_(False)
        names = target_names or find_targets(base_model, config.target_modules, exclude=config.modules_to_save)
        self.layout = Layout([Slot(n, *linear_shape(base_model.get_submodule(n)), config.rank) for n in names])
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
        self.head_modules = self._unfreeze_heads(config.modules_to_save)
        # One reconstruction per root forward: every layer reads the binder's shared result.
        self._hooks = [
            base_model.register_forward_pre_hook(lambda module, args: self.binder.begin_forward()),
            base_model.register_forward_hook(lambda module, args, out: self.binder.end_forward(), always_call=True),
        ]

    def _unfreeze_heads(self, names: list[str]) -> list[str]:
        if not names:
            return []
        found = [n for n, _ in self.base_model.named_modules() if n and name_matches(n, names)]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found)]  # outermost only
        if not found:
            raise UniLoraError(f"modules_to_save {names} matched no module of the model")
        for n in found:
            for param in self.base_model.get_submodule(n).parameters():
                param.requires_grad_(True)
        return found

    # --- running --------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise UniLoraError(
                "adapter_names: mixed-adapter batches are not supported; this model holds a single adapter, "
                "so run one batch per adapter (or load each adapter onto its own model)"
            )
        kwargs.pop("adapter_names", None)
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "projection"):
                raise
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
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
        """Add s·B A into every adapted weight: zero inference overhead until unmerge()."""
        self.binder.invalidate()
        with torch.no_grad():
            for layer in self._layers:
                layer.merge()

    def unmerge(self) -> None:
        with torch.no_grad():
            for layer in self._layers:
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, put the original layer objects back, and return the plain base model."""
        self.merge()
        for layer, slot in zip(self._layers, self.layout.slots):
            parent_name, _, child = slot.name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
        self._layers = []
        for hook in self._hooks:  # the plain model must not pay for (or reach) the projection
            hook.remove()
        self._hooks = []
        return self.base_model

    # --- training -------------------------------------------------------------------
    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"{m}.{n}": p
            for m in self.head_modules
            for n, p in self.base_model.get_submodule(m).named_parameters()
        }

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
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.projection.stored_tensors())
        tensors.update({HEAD_PREFIX + n: p.detach() for n, p in self.head_parameters().items()})
        return tensors

    def adapter_metadata(self) -> dict:
        base_config = getattr(self.base_model, "config", None)
        return adapter_metadata(
            self.config, self.layout, self.projection,
            head_modules=self.head_modules,
            # GPT-2 style Conv1D layers store weights as (in, out): exporters need to know
            fan_in_fan_out=any(is_conv1d(layer.base_layer) for layer in self._layers),
            base_model={"class": type(self.base_model).__name__,
                        "name_or_path": getattr(base_config, "_name_or_path", None) or None},
        )

    def save_pretrained(self, directory: str | os.PathLike, task: dict | None = None) -> None:
        """Write the adapter directory. `task` (JSON-able) is kept beside it, e.g. label names."""
        metadata = self.adapter_metadata()
        if task is not None:
            metadata["task"] = task
        write_adapter_dir(directory, metadata, self.adapter_tensors())

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> "AdaptedModel":
        """Load a saved adapter onto `base_model` (the same architecture it was trained on)."""
        meta, tensors = read_adapter_dir(directory)
        config = AdapterConfig.from_dict(meta["adapter"])
        saved_layout = Layout.from_json(meta["layout"])
        _check_targets_exist(base_model, saved_layout)
        model = cls(base_model, config, target_names=[s.name for s in saved_layout.slots])
        model.layout.require_same(saved_layout)
        model.projection.check_metadata(meta.get("projection", {}))
        model.projection.load_stored_tensors({k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)})
        head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        params = model.head_parameters()
        missing = sorted(set(params) - set(head))
        if missing or set(head) - set(params):
            raise UniLoraError(
                f"adapter head tensors do not fit this model (missing {missing[:3]}, unexpected "
                f"{sorted(set(head) - set(params))[:3]}); load it onto the model class it was trained with"
            )
        for name, value in head.items():
            model.projection._copy_into(params[name], value, HEAD_PREFIX + name)
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model


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
