"""Which adapter runs where: the active adapter for whole batches, or one adapter per row.

An `AdapterRouter` is shared by the model wrapper, every adapted layer and every saved head. It
holds one `FactorBinder` per adapter, the active adapter's name, the on/off switch of
`disable_adapter()`, and, for the length of one mixed-batch forward, the adapter of each row
(per thread, so concurrent no-grad forwards do not see each other's rows).

The root forward hooks go through the router: it opens a forward on the binders of the adapters
that this forward uses (the active one, or those named by the rows) and no other, so a model
holding a thousand adapters pays only for the ones a batch asks for. Factors rebuilt for
inference are cached per adapter; the router keeps the caches of the most recently used
adapters within `cache_limit_bytes` and drops the oldest beyond it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import Iterator

import torch

from ..core.errors import UniLoraError
from .binder import FactorBinder

BASE = "__base__"  # a row that runs the base model alone
DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3
# row layouts whose mix token a thread remembers: a server's batch and the prefills run between its steps
MIXES_REMEMBERED = 8


class RowAdapters:
    """The adapter of each row of one mixed-batch forward, grouped into row indices once per
    batch size and device."""

    def __init__(self, names: list[str]):
        self.names = tuple(names)  # a tuple: the router keys the rows' mix token on it (_mix_token)
        self.distinct = sorted(set(self.names))  # sorted: the same adapters give the same order (layers key on it)
        # each distinct adapter's factor list in this forward (None: the base, or a training forward),
        # set when the forward opens them: layers key what they derive on these lists' identity
        self.factor_lists: tuple | None = None
        # the same object for this thread's forwards of the same rows with the same factor lists (set
        # with them, AdapterRouter._mix_token): a layer reuses what it derived while it sees the same token
        self.mix: object | None = None
        self._cache: dict[tuple, object] = {}
        self._keep: list[torch.Tensor] = []

    def _repeat(self, batch: int) -> int:
        count = len(self.names)
        if batch % count:
            raise UniLoraError(
                f"adapter_names has {count} entries but the batch has {batch} rows; give one adapter name per row"
            )
        return batch // count

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """{adapter name: indices of its rows}. A batch k times as long as the names (generate
        with num_beams or num_return_sequences repeats each input row k times in place) gives
        each name its k consecutive rows."""
        key = ("groups", batch, device)
        found = self._cache.get(key)
        if found is None:
            repeat = self._repeat(batch)
            rows: dict[str, list[int]] = {}
            for row, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(row * repeat, (row + 1) * repeat))
            found = self._cache[key] = {name: torch.tensor(indices, device=device) for name, indices in rows.items()}
        return found

    def has_every_factor_list(self) -> bool:
        """Whether every adapter of the mix has this forward's factor list (no-grad forwards do): what
        a layer keeps across forwards is keyed on these lists."""
        if self.factor_lists is None:
            return False
        found = self._cache.get("every factor list")
        if found is None:
            found = self._cache["every factor list"] = all(
                lists is not None for name, lists in zip(self.distinct, self.factor_lists) if name != BASE)
        return found

    def column_mask(self, positions: torch.Tensor, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 where a column of the concatenated factors (`owner`: the position in `distinct` of its
        adapter) belongs to the row's adapter (`positions`, from `positions()`), else 0: (batch,
        columns). Built once per forward and column layout."""
        key = ("mask", id(positions), id(owner), dtype)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = (positions.unsqueeze(1) == owner.unsqueeze(0)).to(dtype)
            self._keep.append(owner)  # the ids stay these tensors' while the mask is cached
        return found

    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """For each row, the position of its adapter in `distinct`."""
        key = ("positions", batch, device)
        found = self._cache.get(key)
        if found is None:
            repeat = self._repeat(batch)
            where = {name: i for i, name in enumerate(self.distinct)}
            found = self._cache[key] = torch.tensor([where[n] for n in self.names], device=device).repeat_interleave(repeat)
        return found


class AdapterRouter:
    def __init__(self):
        self.active: str | None = None
        self.enabled = True
        self.binders: dict[str, FactorBinder] = {}
        self.cache_limit_bytes = DEFAULT_CACHE_LIMIT_BYTES
        self._init_transient()

    def _init_transient(self) -> None:
        self._local = threading.local()  # this thread's rows and open forwards
        self._lock = threading.Lock()
        self.mixing = 0  # threads inside a mixed-batch forward: layers look up rows only when nonzero
        self._recent: OrderedDict[str, None] = OrderedDict()  # adapters whose inference cache may be live

    # copies and pickles carry the adapters, never a forward in progress
    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("active", "enabled", "binders", "cache_limit_bytes")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_transient()

    # --- rows ------------------------------------------------------------------------------
    def rows(self) -> RowAdapters | None:
        """This thread's per-row adapters, inside a mixed-batch forward."""
        return getattr(self._local, "rows", None)

    @contextlib.contextmanager
    def mixed_rows(self, names, training: bool = False, merged: bool = False) -> Iterator[None]:
        """Run the forwards inside the block with adapter `names[i]` (or the base model) on row i.
        Refused in training mode (`training`) or while an adapter is merged (`merged`)."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise UniLoraError("adapter_names must be a list of adapter names, one per row of the batch")
        unknown = sorted({n for n in names if n != BASE and n not in self.binders})
        if unknown:
            raise UniLoraError(f"adapter_names names {unknown}, which this model does not hold ({list(self.binders)}; "
                               f"'{BASE}' for the base model)")
        if not names:
            raise UniLoraError("adapter_names is empty; give one adapter name per row of the batch")
        if training:
            raise UniLoraError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        if merged:
            raise UniLoraError("adapter_names cannot run while an adapter is merged into the weights; call unmerge() first")
        if self.rows() is not None:
            raise UniLoraError("adapter_names given inside a forward that already has adapter_names")
        self._local.rows = RowAdapters(list(names))
        with self._lock:
            self.mixing += 1
        try:
            yield
        finally:
            self._local.rows = None
            with self._lock:
                self.mixing -= 1

    # --- hooks on the root modules ---------------------------------------------------------
    def hook_into(self, roots, embeddings) -> list:
        """Register the hooks that open and close a forward on each root module (a call of any of
        them is one forward) and the tie on the input embeddings; returns their handles. Bound
        methods, not lambdas: copies and pickles of the model must drive their own router."""
        handles = [handle for root in roots
                   for handle in (root.register_forward_pre_hook(self.begin_forward, with_kwargs=True),
                                  root.register_forward_hook(self.end_forward, always_call=True))]
        if embeddings is not None:
            handles.append(embeddings.register_forward_hook(self.tie_hook))
        return handles

    def _in_use(self) -> list[str]:
        if not self.enabled:
            return []
        rows = self.rows()
        names = rows.distinct if rows is not None else [self.active]
        return [n for n in names if n in self.binders]

    def begin_forward(self, module=None, args=None, kwargs=None) -> None:
        opened = getattr(self._local, "opened", None)
        if opened is None:
            opened = self._local.opened = []
        # The wrapper's own call with adapter_names: its rows are set inside forward, where the
        # wrapped model's call opens the adapters they name.
        names = [] if kwargs and kwargs.get("adapter_names") is not None else self._in_use()
        opened.append(names)
        for name in names:
            self.binders[name].begin_forward(module, args)
        rows = self.rows()
        if rows is not None and names and rows.factor_lists is None:
            rows.factor_lists = tuple(self.binders[n].forward_factors() if n in self.binders else None
                                      for n in rows.distinct)
            rows.mix = self._mix_token(rows)
        if names and not any(opened[:-1]) and not torch.is_grad_enabled():  # once per outermost forward
            self._bound_caches(names)

    def _mix_token(self, rows: RowAdapters) -> object:
        """The token this thread gave the same rows last time if every adapter's factor list is still
        the same (a server's decode step after a decode step, with other requests' prefills in
        between), else a new one. The last MIXES_REMEMBERED row layouts are remembered per thread,
        their lists weakly: a token must not keep a reconstruction alive past the cache bound."""
        remembered = getattr(self._local, "mixes", None)
        if remembered is None:
            remembered = self._local.mixes = OrderedDict()
        lists = rows.factor_lists
        found = remembered.get(rows.names)
        if found is not None and all((None if ref is None else ref()) is current
                                     for ref, current in zip(found[0], lists)):
            remembered.move_to_end(rows.names)
            return found[1]
        token = object()
        remembered[rows.names] = (tuple(None if current is None else weakref.ref(current) for current in lists), token)
        remembered.move_to_end(rows.names)
        while len(remembered) > MIXES_REMEMBERED:
            remembered.popitem(last=False)
        return token

    def end_forward(self, module=None, args=None, output=None) -> None:
        opened = getattr(self._local, "opened", None)
        if not opened:
            return
        for name in opened.pop():
            binder = self.binders.get(name)
            if binder is not None:
                binder.end_forward(module, args, output)

    def tie_hook(self, module, args, output):
        """Only the active adapter trains, so only its reconstruction is tied to the embeddings."""
        binder = self.binders.get(self.active) if self.enabled and self.rows() is None else None
        return binder.tie_hook(module, args, output) if binder is not None else None

    def _bound_caches(self, in_use: list[str]) -> None:
        for name in in_use:
            self._recent[name] = None
            self._recent.move_to_end(name)
        total = sum(self.binders[n].cached_bytes() for n in self._recent if n in self.binders)
        for name in list(self._recent):
            if total <= self.cache_limit_bytes:
                break
            if name in in_use:
                continue
            binder = self.binders.get(name)
            if binder is not None:
                total -= binder.cached_bytes()
                binder.invalidate()
            del self._recent[name]

    # --- adapters --------------------------------------------------------------------------
    def check_new_name(self, name) -> None:
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise UniLoraError(f"adapter name {name!r} is not allowed: use a non-empty name without '.', other than '{BASE}'")
        if name in self.binders:
            raise UniLoraError(f"this model already holds an adapter named '{name}'; delete_adapter('{name}') first "
                               "or choose another name")

    def add(self, name: str, binder: FactorBinder) -> None:
        self.binders[name] = binder
        if self.active is None:
            self.active = name

    def remove(self, name: str) -> None:
        self.binders.pop(name, None)
        self._recent.pop(name, None)
