"""The common shape of every method: a projection from trainable θ_d to θ_D = P θ_d.

A method is one file: a Projection subclass registered by name (`@register_method`), its options
(a `MethodOptions` dataclass: its own fields, defaults and checks), its recipe (the defaults and
learning rates used where a user leaves them open), its PEFT mapping where PEFT has the method
(`peft_type`, `peft_state`, `peft_config`, `from_peft`) and, where its frozen parts come from the
base model's weights (an SVD), `needs_base_weights` and `attach`. A method that trains one vector
names it (`vector`) and gets its parameter group and its storage from here.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..core.config import AdapterConfig, MethodOptions
from ..core.errors import UniLoraError
from ..core.layout import Layout
from .peft_format import PeftReading, PeftSource


class ScaledFactors(NamedTuple):
    """A layer's factors as frozen matrices plus trainable vectors: A_l = diag(d) A, Bᵀ_l = Bᵀ diag(b).

    Layers apply the vectors to activations instead of forming A_l and Bᵀ_l, so backward never
    computes a weight gradient for the frozen A, Bᵀ (VeRA at rank 256 would pay a full matmul).
    """

    a: torch.Tensor  # (r, in), frozen
    d: torch.Tensor  # (r,)
    bt: torch.Tensor  # (r, out), frozen
    b: torch.Tensor  # (out,)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d.unsqueeze(1) * self.a, self.bt * self.b


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method's tuned settings, used where the user leaves a choice open (`finetune`, `compress`,
    `count`); how each was chosen is written beside it in the method's file."""

    defaults: dict  # AdapterConfig fields, tuned on the embedded MiniLM with all linear layers adapted
    group_lrs: dict  # learning rate per parameter group (the names `param_groups` returns)
    paper: dict | None = None  # the papers' settings on RoBERTa, for `unilora count`
    # per teacher kind ("seq-cls", "causal-lm"): rates that replace group_lrs for a distilled student
    distill_group_lrs: dict = dataclasses.field(default_factory=dict)
    # D/d where the θ rate was tuned (each θ_d entry feeds D/d LoRA weights); other models scale it
    tuned_sharing: float | None = None
    # fields of `defaults` that fit MiniLM's shapes only: on other models the method chooses them
    model_specific: tuple = ()


@dataclasses.dataclass(frozen=True)
class TrainedVector:
    """The one trained vector of a method that trains one (θ_d, LoRA's flat weights, VeRA's scales)."""

    attribute: str  # the nn.Parameter's name on the projection (its state-dict key)
    key: str  # its tensor's name in an adapter file
    group: str  # its optimizer parameter group


class FixedParts:
    """The seeded, never-trained tensors of a projection (Uni-LoRA's index vector and scales,
    VeRA's matrices, Fastfood's transform) and what was derived from the draw."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __getstate__(self) -> dict:
        """Copies and pickles keep the tensors; what names `_private` (weak references to the base
        weights an SVD came from) belongs to this process's cache only."""
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}


_FIXED_PARTS: "weakref.WeakValueDictionary[tuple, FixedParts]" = weakref.WeakValueDictionary()
_FIXED_PARTS_LOCK = threading.Lock()


def shared_fixed_parts(key: tuple, draw: Callable[[], dict],
                       still_valid: Callable[[FixedParts], bool] | None = None) -> FixedParts:
    """Draw the fixed parts for `key` once while any projection holds them: adapters of the same
    method, layout and seed then share one copy (an extra adapter costs its trained tensors only).
    Every projection registers these same tensors as its buffers and never writes into them.
    `still_valid` rejects a held copy that no longer fits the key's meaning (it is drawn again)."""
    with _FIXED_PARTS_LOCK:
        parts = _FIXED_PARTS.get(key)
        if parts is None or (still_valid is not None and not still_valid(parts)):
            parts = FixedParts(**draw())
            _FIXED_PARTS[key] = parts
        return parts


class Projection(nn.Module):
    """Owns every shared tensor of one adapter and rebuilds all layers' (A, Bᵀ) in one call.

    Subclasses implement `factors_from(theta)`, the fast path. `theta` is the method's main
    trainable tensor (θ_d); `project(theta)` flattens the result to θ_D for checks against a
    dense P. Stored tensors are what an adapter file holds; they may differ from the
    trainable ones (VB-LoRA keeps top-k indices instead of logits).
    """

    method: str = ""
    summary: str = ""  # one line: what trains and what is stored (`unilora methods`, --help)
    options: type[MethodOptions] = MethodOptions  # the method's own settings (fields of AdapterConfig)
    vector: TrainedVector | None = None  # where the method trains one vector
    peft_type: str | None = None  # PEFT's adapter type of the same method, where PEFT has one
    # what reading PEFT's files of the method needs of the base model: None, "shapes" or "weights"
    peft_needs_model: str | None = None
    peft_projection_optional = False  # PEFT redraws the fixed parts from the seed when they are left out
    stochastic: bool = False  # a training-mode reconstruction that samples (VB-LoRA's noisy / Gumbel selection)
    recipe: Recipe | None = None
    # Frozen parts that come from the adapted layers' base weights (e.g. their SVD), given to
    # `attach`; tools that build a projection without a model refuse such a method.
    needs_base_weights: bool = False
    # why the file keeps fewer numbers than training moved, for a method where it does
    stored_note: str | None = None

    def __init__(self, layout: Layout, config: AdapterConfig):
        super().__init__()
        self.layout = layout
        self.config = config
        self.attached = False  # set once `attach` has the base weights (methods that need them)

    @classmethod
    def resolve_config(cls, config: AdapterConfig, layout: Layout) -> AdapterConfig:
        """`config` with the settings it left to the method chosen for this layout (VB-LoRA's b)."""
        return config

    def attach(self, base_weights: list[torch.Tensor]) -> None:
        """Called once, when the projection joins a model and before anything is loaded into it, with
        each slot's frozen base weight (out × in, in layout order) where `needs_base_weights`."""

    # --- the projection -------------------------------------------------------------
    @property
    def theta(self) -> torch.Tensor:
        if self.vector is None:
            raise NotImplementedError
        return getattr(self, self.vector.attribute)

    def factors_from(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.require_attached()
        return self.factors_from(self.theta)

    def require_attached(self) -> None:
        """Refuse to build factors that would need base weights this projection never received."""
        if self.needs_base_weights and not self.attached:
            raise UniLoraError(f"this {self.method} adapter has no frozen factors: they come from the base model's "
                               "weights, and it was built without them (read without its model, or added to a model on "
                               "the meta device); add or load it onto a model that holds its weights")

    def eval_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The deterministic (eval-mode) factors, without gradients: what merge and export use."""
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad():
                return self.factors()
        finally:
            self.train(was_training)

    def layer_factors(self) -> list:
        """What the adapted layers use in forward: (A, Bᵀ) pairs, or ScaledFactors per layer."""
        return self.factors()

    def forward(self) -> torch.Tensor:
        """θ_D for the current parameters (lets torch.func.functional_call swap them in tests)."""
        return self.project(self.theta)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """θ_D for a given θ_d (flattened A, Bᵀ of every layer)."""
        return torch.cat([t.reshape(-1) for pair in self.factors_from(theta) for t in pair])

    def fit_to(self, target: torch.Tensor) -> bool:
        """Set the trained tensors to the least-squares fit of θ_D = `target`, where the method has a
        closed form (True); False where it has none (compress then fits by gradient steps)."""
        return False

    # --- training -------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups of trainable parameters, for separate learning rates."""
        if self.vector is None:
            raise NotImplementedError
        return {self.vector.group: [self.theta]}

    # --- storage --------------------------------------------------------------------
    @classmethod
    def stored_spec(cls, layout: Layout, config: AdapterConfig) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, "float" or "index") of every tensor an adapter file of this method holds;
        checked against the file's header before anything is loaded or built."""
        if cls.vector is None:
            raise NotImplementedError
        return {cls.vector.key: ((cls.vector_length(layout, config),), "float"), **cls.fixed_spec(layout, config)}

    @classmethod
    def vector_length(cls, layout: Layout, config: AdapterConfig) -> int:
        """The length of the trained vector (`vector`)."""
        raise NotImplementedError

    @classmethod
    def fixed_spec(cls, layout: Layout, config: AdapterConfig) -> dict[str, tuple[tuple[int, ...], str]]:
        """The fixed parts an adapter file keeps beside the trained vector (adapters converted from
        PEFT, whose parts came from torch's RNG: `fixed_parts="stored"`)."""
        return {}

    @classmethod
    def build_bytes(cls, layout: Layout, config: AdapterConfig) -> int:
        """Bytes that building the projection and one reconstruction allocate (checked against the
        memory available before building from a file)."""
        return 8 * layout.D

    @classmethod
    def check_stored_values(cls, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
        """Method-specific value checks beyond finiteness (VB-LoRA's indices and weights)."""

    def stored_tensors(self, store: str | None = None) -> dict[str, torch.Tensor]:
        """What an adapter file holds (`store` matters to VB-LoRA only)."""
        if self.vector is None:
            raise NotImplementedError
        return {self.vector.key: self.theta.detach(), **self.stored_fixed_tensors()}

    def stored_fixed_tensors(self) -> dict[str, torch.Tensor]:
        """The fixed parts this projection's file keeps (see `fixed_spec`)."""
        return {}

    def load_stored_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.vector is None:
            raise NotImplementedError
        key = self.vector.key
        self._require_tensors(tensors, [key, *self.stored_fixed_tensors()])
        copy_into(self.theta, tensors[key], key)
        self.load_fixed_tensors(tensors)

    def load_fixed_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the fixed parts a file keeps (`stored_fixed_tensors`' names, checked present)."""

    # --- PEFT's format of the same method (tools/peft_native.py) --------------------------
    def peft_state(self, names: list[str], save_projection: bool = True) -> dict[str, torch.Tensor]:
        """PEFT's state-dict entries of this adapter, its layers named `names` (PEFT_LAYER.format(name, part)
        for a layer's tensors, "base_model.<part>" for shared ones)."""
        raise UniLoraError(f"PEFT 0.21.2 has no {self.method} adapter type; `unilora export` writes any adapter as "
                           "PEFT LoRA")

    def peft_config(self, save_projection: bool = True) -> dict:
        """The fields of PEFT's adapter_config.json that are this method's own."""
        return {}

    @classmethod
    def from_peft(cls, source: PeftSource) -> PeftReading:
        """Our adapter from PEFT's directory of this method (`source`: methods.peft_format.PeftSource)."""
        raise UniLoraError(f"PEFT has no {cls.method} adapter type to read")

    def stored_param_count(self) -> int:
        """Float32-equivalent stored parameters (seed 003 §3.4 accounting)."""
        return sum(t.numel() for t in self.stored_tensors().values())

    def metadata(self) -> dict:
        """JSON-able facts that must match on reload (e.g. a checksum of a seeded draw)."""
        return {}

    def check_metadata(self, saved: dict) -> None:
        mine = self.metadata()
        missing = sorted(set(mine) - set(saved))
        if missing:
            raise UniLoraError(
                f"{self.method} adapter config lacks {missing} under 'projection': without the checksum of its "
                "seeded draw it cannot be verified; re-save the adapter with this unilora version"
            )
        for key, value in saved.items():
            if mine.get(key) != value:
                raise UniLoraError(
                    f"{self.method} adapter was saved with {key}={value!r} but this install rebuilds "
                    f"{mine.get(key)!r}; the seeded projection differs, so the adapter cannot be used here"
                )

    def share_fixed_parts_with(self, others) -> None:
        """Moved to a device, projections of one seeded draw would each hold a copy of it: point this
        one's fixed buffers at the copy another projection of the same draw holds (same device, dtype)."""
        fixed = getattr(self, "fixed", None)
        other = next((p for p in others if p is not self and fixed is not None and getattr(p, "fixed", None) is fixed),
                     None)
        if other is None:
            return
        shared = self.fixed_buffer_names()
        for name, buffer in other.named_buffers(recurse=False):
            mine = self._buffers.get(name) if name in shared else None
            if mine is not None and mine.device == buffer.device and mine.dtype == buffer.dtype:
                self._buffers[name] = buffer

    def fixed_buffer_names(self) -> set[str]:
        """The buffers that hold `self.fixed` (the same in every projection of that draw)."""
        return {name for name, _ in self.named_buffers(recurse=False)}

    # --- helpers --------------------------------------------------------------------
    def _require_tensors(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UniLoraError(f"{self.method} adapter file lacks tensors {missing}; the file is incomplete or not a {self.method} adapter")


def copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Copy a tensor read from an adapter file into a parameter or buffer of the same shape."""
    if tuple(value.shape) != tuple(param.shape):
        raise UniLoraError(f"adapter tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
