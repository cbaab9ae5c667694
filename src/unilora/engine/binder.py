"""Hands every adapted layer its (A, Bᵀ) from one reconstruction per forward pass.

Training forward (gradients on): the root module's pre-hook reconstructs once and the layers
read that one result R.

With gradient checkpointing on, the layers instead read detached leaf copies of R, and the input
embeddings' output is routed through `_Tie`, an identity whose backward hands the leaves'
accumulated gradients to R. The tie sits upstream of every block, so its backward runs once,
after all layers have produced their gradients, however the backward was split:

- reentrant checkpointing re-runs each block in a nested backward of its own; the nested passes
  only fill the leaves, never reach R (whose graph the first of them would otherwise free);
- under DDP the projection's parameters get their gradient exactly once per backward, in the
  outer pass, so the all-reduce sees the whole gradient with or without `static_graph`.

The tie makes the embeddings' output require a gradient, which checkpointing already asks for
(transformers' enable_input_require_grads); without checkpointing it would only add backward work
in front of the first block, so it is off (`tie_to_embeddings`: None = on exactly when a module
has transformers' `gradient_checkpointing` flag set; True / False force it, e.g. for
torch.utils.checkpoint called by hand). Without the tie, a layer called with gradients outside a
root forward (a re-run block) reconstructs afresh, which is correct in one process.

No gradients (evaluation, generation): the factors are cached and rebuilt when the projection's
tensors change. The check compares a snapshot of the trainable tensors, so `.data` edits,
`load_state_dict`, optimizer steps and `.to()` are all seen; it costs one comparison of θ_d.

Threads: the forward depth and the training pass are per thread (a small record that lives only
while the thread's forward runs); the cache is shared behind a lock. Forward passes from several threads are safe; two threads training one model at the same
time are refused.
"""

from __future__ import annotations

import threading

import torch

from ..core.errors import UniLoraError
from ..methods import Projection
from ..methods.base import ScaledFactors


def _rebuild_like(template, items: list):
    return ScaledFactors._make(items) if isinstance(template, ScaledFactors) else tuple(items)


class _TrainingPass:
    """One training forward's reconstruction, the leaves the layers read, and the ties."""

    def __init__(self, factors: list, thread: int, allow_tie: bool):
        self.factors = factors
        self.thread = thread
        self.allow_tie = allow_tie
        self.sources: list[torch.Tensor] = []
        self.leaves: list[torch.Tensor] = []
        self.leaf_factors = []
        for slot_factors in factors if allow_tie else []:
            items = []
            for t in slot_factors:
                if t.requires_grad:
                    leaf = t.detach().requires_grad_(True)
                    self.sources.append(t)
                    self.leaves.append(leaf)
                    t = leaf
                items.append(t)
            self.leaf_factors.append(_rebuild_like(slot_factors, items))
        self.mode: str | None = None  # "tied" once a layer read the leaves, "plain" if no tie came first
        self.ties = 0
        self.flushed = 0
        self.in_forward = True
        self._late_check_armed = False
        for leaf in self.leaves:
            leaf.register_post_accumulate_grad_hook(self._on_leaf_gradient)

    def serve(self, slot: int):
        if self.mode is None:
            self.mode = "tied" if self.ties else "plain"
        return self.leaf_factors[slot] if self.mode == "tied" else self.factors[slot]

    @property
    def awaiting_backward(self) -> bool:
        return self.mode == "tied" and self.flushed < self.ties

    def take_gradients(self) -> list:
        """The leaves' gradients so far (each tie passes on what arrived before it)."""
        grads = [leaf.grad for leaf in self.leaves]
        for leaf in self.leaves:
            leaf.grad = None
        self.flushed += 1
        return grads

    def _on_leaf_gradient(self, leaf: torch.Tensor) -> None:
        # A gradient after every tie has run would never reach the projection: check at the end
        # of this backward that none is left behind.
        if self.mode == "tied" and self.flushed >= self.ties and not self._late_check_armed:
            self._late_check_armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._check_nothing_left)

    def _check_nothing_left(self) -> None:
        self._late_check_armed = False
        if any(leaf.grad is not None for leaf in self.leaves):
            raise UniLoraError(
                "an adapted layer received its gradient after the input embeddings' backward, so it could not "
                "reach the adapter; this model runs adapted layers outside the path from its input embeddings: "
                "set model.binder.tie_to_embeddings = False before training"
            )


class _ForwardState:
    """One thread's root forward in progress: nesting depth and what its layers read."""

    __slots__ = ("depth", "training_pass", "cached")

    def __init__(self):
        self.depth = 0
        self.training_pass: _TrainingPass | None = None
        self.cached: list | None = None


class _Tie(torch.autograd.Function):
    """Identity on the embeddings' output; backward passes the leaves' gradients to the
    reconstruction (see the module docstring)."""

    @staticmethod
    def forward(ctx, state: _TrainingPass, hidden: torch.Tensor, *sources: torch.Tensor):
        ctx.state = state
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        return (None, grad_hidden, *ctx.state.take_gradients())


class FactorList(list):
    """The factors of every layer from one reconstruction. A new list whenever they are rebuilt, so
    what a layer derives from them is kept while it sees the same list; a list subclass so that it
    can be referenced weakly (factor_bank.py)."""


class FactorBinder:
    def __init__(self, projection: Projection):
        self.projection = projection
        self.enabled = True
        self.tie_to_embeddings: bool | None = None  # None: when gradient checkpointing is on
        self._init_transient()

    def _init_transient(self) -> None:
        self._forwards: dict[int, _ForwardState] = {}  # by thread, only while a forward runs
        self._lock = threading.Lock()
        self._cache = None  # (key, snapshot, factors)
        self._pass: _TrainingPass | None = None  # the latest training forward's

    # copies and pickles carry the projection, never a forward's state or autograd graph
    def __getstate__(self) -> dict:
        return {"projection": self.projection, "enabled": self.enabled, "tie_to_embeddings": self.tie_to_embeddings}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_transient()

    def _forward(self) -> "_ForwardState | None":
        """This thread's forward in progress, if any."""
        return self._forwards.get(threading.get_ident())

    def _trainable(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.projection.parameters())

    # --- hooks on the wrapped model ---------------------------------------------------
    def begin_forward(self, module=None, args=None) -> None:
        current = threading.get_ident()
        forward = self._forwards.setdefault(current, _ForwardState())
        forward.depth += 1
        if forward.depth > 1 or not self.enabled:
            return
        if self._trainable():
            latest = self._pass
            if latest is not None and latest.thread != current and latest.in_forward:
                self._forwards.pop(current, None)
                raise UniLoraError(
                    "another thread is running a training forward of this model; training one model from "
                    "several threads at once is not supported (no-grad forwards from any thread are fine)"
                )
            tie = self.tie_to_embeddings
            if tie is None:
                tie = module is not None and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
            training_pass = _TrainingPass(self.projection.layer_factors(), current, tie)
            self._pass = forward.training_pass = training_pass
        else:
            forward.cached = self._cached_factors()

    def end_forward(self, module=None, args=None, output=None) -> None:
        forward = self._forward()
        if forward is None:
            return
        forward.depth -= 1
        if forward.depth <= 0:
            if forward.training_pass is not None:
                forward.training_pass.in_forward = False
            self._forwards.pop(threading.get_ident(), None)

    def tie_hook(self, module, args, output):
        """Forward hook on the input embeddings: route their output through the tie."""
        forward = self._forward()
        training_pass = forward.training_pass if forward is not None else None
        if (training_pass is None or training_pass.mode == "plain" or not training_pass.allow_tie
                or not isinstance(output, torch.Tensor) or not output.is_floating_point()
                or not torch.is_grad_enabled() or not training_pass.sources):
            return None
        training_pass.ties += 1
        return _Tie.apply(training_pass, output, *training_pass.sources)

    # --- what the layers read ----------------------------------------------------------
    def factors(self, slot: int):
        """The slot's (A, Bᵀ), or its ScaledFactors (see Projection.layer_factors)."""
        forward = self._forward()
        if forward is not None:
            if forward.training_pass is not None:
                return forward.training_pass.serve(slot)
            if forward.cached is not None:
                return forward.cached[slot]
        elif torch.is_grad_enabled():
            # Outside a root forward: a checkpointed block re-run during backward, or a block
            # called directly.
            latest = self._pass
            if latest is not None and latest.awaiting_backward:
                return latest.leaf_factors[slot]
            if self._trainable():
                return self.projection.layer_factors()[slot]
        return self._cached_factors()[slot]

    def _cached_factors(self) -> list:
        projection = self.projection
        tensors = list(projection.parameters()) + list(projection.buffers())
        key = (projection.training, tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in tensors))
        cache = self._cache
        if cache is not None and cache[0] == key and self._snapshot_matches(cache[1]):
            return cache[2]
        with self._lock, torch.no_grad():
            factors = FactorList(projection.layer_factors())
            if not (projection.training and projection.stochastic):
                snapshot = [p.detach().clone() for p in projection.parameters()]
                self._cache = (key, snapshot, factors, self._bytes_beyond_projection(factors))
        return factors

    def _snapshot_matches(self, snapshot: list) -> bool:
        return all(torch.equal(p, s) for p, s in zip(self.projection.parameters(), snapshot))

    def invalidate(self) -> None:
        self._cache = None

    def cached_bytes(self) -> int:
        """Bytes the inference cache holds beyond the projection's own tensors (counted once, when
        the cache is built: the router asks on every forward)."""
        cache = self._cache
        return 0 if cache is None else cache[3]

    def forward_factors(self) -> list | None:
        """The factors this thread's forward reads (the inference cache's list), or None in a training
        forward: layers may keep what they derive from this list while they see the same list."""
        forward = self._forward()
        return forward.cached if forward is not None and forward.training_pass is None else None

    def _bytes_beyond_projection(self, factors: list) -> int:
        """Bytes of `factors` beyond the projection's own tensors (views of one reconstruction counted once)."""
        own = {t.untyped_storage().data_ptr() for t in (*self.projection.parameters(), *self.projection.buffers())}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for f in factors for t in f}
        return sum(n for ptr, n in storages.items() if ptr not in own)
