"""unilora adapters in vLLM, through its LoRA resolver plugin API.

vLLM serves plain LoRA. When a request names an adapter vLLM does not hold, it asks its
registered resolvers; ours looks the name up in a unilora store (a folder or an fsspec URL),
expands the adapter into an exact PEFT LoRA folder (`export`: B = the method's B, A its A, no rank
padding, `base_model_name_or_path` = the model vLLM serves) in a bounded cache, and hands vLLM
that folder. The store keeps each adapter's few kilobytes; vLLM runs them at its own speed.
LoRA-XS and TinyLoRA adapters are rebuilt from the base model's weights: the resolver loads that
model once (on the CPU, beside vLLM's copy) and keeps it, so their SVD is taken once per rank.

Refused (the resolver answers None, and vLLM answers the client with its own "model does not
exist" error): a name that is not a plain name, an adapter the validating reader refuses, and an
adapter recorded for another base model.

Switched on in vLLM's environment by the entry point `unilora_resolver` (group
`vllm.general_plugins`) and these variables:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True   (vLLM's switch for loading adapters at run time)
    VLLM_PLUGINS=unilora_resolver           (optional: load only this plugin)
    UNILORA_VLLM_STORE=/srv/adapters        (a folder of adapter folders, or s3://..., memory://...)
    UNILORA_VLLM_CACHE=/var/cache/unilora   (where the expanded PEFT folders go; default ~/.cache)
    UNILORA_VLLM_CACHE_ADAPTERS=256         (expanded folders kept; the least recently used go first)

and `vllm serve MODEL --enable-lora --max-lora-rank R` as for any LoRA.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

from ..core.errors import UniLoraError
from ..core.resources import cache_root
from ..models.adapter_base import base_model_name, base_model_of
from ..models.embedded_llm import DEQUANTIZED_FOLDER, EMBEDDED_LLM, EMBEDDED_LLM_HUB_NAME, is_embedded_llm
from ..store.io import WEIGHTS_NAME
from ..store.source import AdapterStore
from ..tools.export import export_peft_lora

log = logging.getLogger("unilora.vllm")
RESOLVER_NAME = "unilora"
DEFAULT_CACHED = 256


def same_base(recorded: str | None, served: str) -> bool:
    """Whether an adapter recorded for `recorded` fits the model vLLM serves as `served`: the same
    name, or the same last path part (a hub name and a local copy of it), case aside. An adapter
    that records no base is taken."""
    if not recorded:
        return True

    def key(name: str) -> str:
        name = EMBEDDED_LLM_HUB_NAME if is_embedded_llm(name) or is_dequantized_copy(name) else name
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    return recorded == served or key(recorded) == key(served)


def is_dequantized_copy(name: str) -> bool:
    """Whether `name` is the folder the embedded SmolLM2 is dequantized into (cache_root()/...)."""
    return name.rstrip("/").rsplit("/", 1)[-1] == DEQUANTIZED_FOLDER


def other_weights_warning(name: str, recorded: str | None, served: str) -> str | None:
    """A warning for an adapter trained on the embedded SmolLM2's dequantized copy but served by vLLM on
    other weights of that model (the hub's bf16 release): it runs, with other logits than it was trained on."""
    if recorded and is_embedded_llm(recorded) and not is_dequantized_copy(served):
        return (f"unilora adapter '{name}' was trained on the embedded {EMBEDDED_LLM} dequantized from GGUF Q4_1; "
                f"vLLM serves '{served}', whose weights differ: serve the dequantized copy (unilora export names "
                "it) for the adapter's own logits")
    return None


class UniloraResolution:
    """What the plugin does, without vLLM: a store name in, an expanded PEFT LoRA folder out."""

    def __init__(self, store: str, cache: str | os.PathLike | None = None, max_cached: int = DEFAULT_CACHED):
        self.store = store.rstrip("/")
        self.adapters = AdapterStore(self.store)
        self.cache = Path(cache) if cache else cache_root() / "vllm-lora"
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._base = None  # (name, model): the base SVD-family adapters rebuild their factors from
        self._warned: set[str] = set()  # adapters whose other-weights warning was logged

    def base_for(self, meta: dict, served: str):
        """The base model whose weights an SVD-family adapter (LoRA-XS, TinyLoRA) is rebuilt from, loaded
        once and kept, so every such adapter shares one load and one SVD per rank (`shared_fixed_parts`).
        The model vLLM serves (its weights are what the LoRA will act on), else the one the adapter records;
        a name found on this machine first (a hub name off the network can take a minute to fail)."""
        names = [name for name in dict.fromkeys([served, base_model_name(meta)]) if name]
        names.sort(key=lambda name: not (Path(name).is_dir() or is_embedded_llm(name)))
        if self._base is not None and self._base[0] in names:
            return self._base[1]
        failures = []
        for name in names:
            try:
                self._base = (name, base_model_of(meta, name).eval().requires_grad_(False))
                return self._base[1]
            except UniLoraError as err:
                failures.append(str(err))
        raise UniLoraError(f"its factors come from the base model's weights, which could not be loaded: {'; '.join(failures)}")

    def source(self, name: str) -> tuple[Path, dict]:
        """The local folder of store adapter `name` and its validated config, read through the store
        the server uses (the name rule, containment after symlinks, a verified copy of a URL's)."""
        adapter, _ = self.adapters.read(name)
        return self.adapters.folder(name), adapter.meta

    def resolve(self, served: str, name: str) -> tuple[str, int] | None:
        """(PEFT folder, a stable positive integer id), or None where the adapter is refused."""
        try:
            folder, meta = self.source(name)
            recorded = base_model_name(meta)
            if not same_base(recorded, served):
                log.warning("unilora adapter '%s' was trained on '%s', not on '%s'", name, recorded, served)
                return None
            warning = other_weights_warning(name, recorded, served)
            if warning and name not in self._warned:
                self._warned.add(name)
                log.warning(warning)
            version = hashlib.sha256((meta.get("config_sha256", "") + meta.get("weights_sha256", "")
                                      + served).encode()).hexdigest()[:16]
            out = self.cache / f"{name}-{version}"
            with self._lock:
                if not (out / "adapter_config.json").is_file():
                    self.cache.mkdir(parents=True, exist_ok=True)
                    # asked for only by a method built from the base weights, with the validated config
                    export_peft_lora(folder, out, base_model=served, model=lambda checked: self.base_for(checked, served))
                os.utime(out)  # recently used: the bound evicts others first
                self._bound(keep=out)
            return str(out), int(version[:15], 16) + 1
        except UniLoraError as err:
            log.warning("unilora adapter '%s' refused: %s", name, err)
            return None

    def _bound(self, keep: Path) -> None:
        """Keep at most `max_cached` expanded folders (only those this resolver wrote)."""
        ours = [p for p in self.cache.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()
                and (p / WEIGHTS_NAME).is_file() and p != keep]
        ours.sort(key=lambda p: p.stat().st_mtime)
        for old in ours[: max(0, len(ours) + 1 - self.max_cached)]:
            shutil.rmtree(old, ignore_errors=True)


def from_environment() -> UniloraResolution | None:
    store = os.environ.get("UNILORA_VLLM_STORE")
    if not store:
        return None
    cached = int(os.environ.get("UNILORA_VLLM_CACHE_ADAPTERS", DEFAULT_CACHED))
    return UniloraResolution(store, os.environ.get("UNILORA_VLLM_CACHE"), cached)


def register() -> None:
    """vLLM's plugin entry point: register the resolver when UNILORA_VLLM_STORE names a store."""
    from vllm.lora.request import LoRARequest  # vLLM's own environment only
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    try:
        resolution = from_environment()
    except UniLoraError as err:  # a store that cannot be read: vLLM serves on, without this resolver
        log.warning("unilora resolver not registered: %s", err)
        return
    if resolution is None:
        log.warning("unilora resolver not registered: set UNILORA_VLLM_STORE to a folder or URL of adapters")
        return

    class UniloraResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            found = await asyncio.to_thread(resolution.resolve, base_model_name, lora_name)
            if found is None:
                return None
            path, lora_id = found
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=path)

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, UniloraResolver())
