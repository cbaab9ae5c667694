"""What one adapter's folder holds, built from and loaded into the live objects: the config
(adapter_config.json: everything needed to rebuild the projection), the tensors (the projection's
stored tensors and the trained heads, from a live model or from a full state dict of it), and
loading a validated adapter back into a projection and its heads. io.py writes and reads the
folder itself."""

from __future__ import annotations

import copy

import torch

from .._version import __version__
from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.layout import Layout
from ..methods.base import Projection, copy_into
from .io import FORMAT_VERSION, HEAD_PREFIX, AdapterFile

# what may stand before a model's own keys in a full state dict: nothing, DDP's wrapper, torch.compile's
STATE_DICT_PREFIXES = ("", "module.", "_orig_mod.")


def adapter_metadata(config: AdapterConfig, layout: Layout, projection: Projection, head_modules=(),
                     fan_in_fan_out: bool = False, base_model: dict | None = None, **extra) -> dict:
    """The adapter_config.json of an adapter: everything needed to rebuild its projection."""
    return {
        "format": "unilora",
        "format_version": FORMAT_VERSION,
        "unilora_version": __version__,
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


def adapter_tensors(projection: Projection, heads: dict[str, torch.Tensor], store: str | None = None) -> dict:
    """The tensors an adapter file holds: the projection's stored ones (`store` overrides VB-LoRA's
    config.store) and every head tensor, by its parameter name, under head."""
    tensors = dict(projection.stored_tensors(store=store))
    tensors.update({HEAD_PREFIX + name: value.detach() for name, value in heads.items()})
    return tensors


def from_state_dict(state_dict: dict[str, torch.Tensor], projection: Projection, projection_key: str,
                    head_keys: dict[str, str]) -> tuple[Projection, dict[str, torch.Tensor]]:
    """(a copy of `projection` holding the state dict's values, the heads' tensors) from a full state
    dict of the model (what transformers.Trainer passes when parameters are sharded), whose keys may
    carry a wrapper's prefix. `projection_key`: the projection's prefix among the model's own keys;
    `head_keys`: each head tensor's name -> its key."""
    names = [projection_key + key for key in projection.state_dict()]
    strip = next((p for p in STATE_DICT_PREFIXES if all(p + key in state_dict for key in names)), None)
    if strip is None:
        raise UniLoraError("the state_dict passed to save_pretrained lacks this adapter's projection tensors")
    loaded = copy.deepcopy(projection)  # small: θ and its fixed parts
    loaded.load_state_dict({key[len(projection_key):]: state_dict[strip + key] for key in names})
    heads = {}
    for name, key in head_keys.items():
        if strip + key not in state_dict:
            raise UniLoraError(f"the state_dict passed to save_pretrained lacks the head tensor '{strip + key}'")
        heads[name] = state_dict[strip + key]
    return loaded, heads


def load_into(adapter: AdapterFile, layout: Layout, projection: Projection, heads: dict[str, torch.Tensor]) -> None:
    """Put a validated adapter's tensors into `projection` (built for `layout`; its seeded draw must
    match the adapter's) and its head tensors into `heads` (name -> parameter)."""
    layout.require_same(adapter.layout)
    projection.check_metadata(adapter.meta.get("projection", {}))
    missing, unexpected = sorted(set(heads) - set(adapter.head)), sorted(set(adapter.head) - set(heads))
    if missing or unexpected:
        raise UniLoraError(
            f"adapter head tensors do not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); load it onto the model class it was trained with"
        )
    projection.load_stored_tensors(adapter.tensors)
    for name, value in adapter.head.items():
        copy_into(heads[name], value, HEAD_PREFIX + name)


def require_same_config(adapter: AdapterFile, config: AdapterConfig) -> None:
    """Refuse an adapter configured otherwise than `config` (VB-LoRA's `store` may differ): what loading
    its weights in place, as resuming a checkpoint does, needs."""
    mine, theirs = config.to_dict(), adapter.config.to_dict()
    mine.pop("store"), theirs.pop("store")
    if mine != theirs:
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise UniLoraError(f"'{adapter.path}' holds an adapter configured differently from this model's ({changed}); "
                           "load it with unilora.from_pretrained or model.load_adapter instead")
