"""The one thread that runs the model: admits waiting requests, steps the running batch, hands
tokens back.

Each turn of its loop (1) attaches the adapters the waiting requests name and prefills them into
the running batch, as far as `max_batch` allows, then (2) runs one decode step for every row. A
request that arrives while others decode therefore joins at the next step (iteration-level
scheduling), and rows of any adapters, or of the base model, share every forward.

Nothing a request does can stop the loop: a bad adapter fails that request alone; a timed-out or
cancelled (disconnected) request leaves the batch at the next step. An exception inside a forward
is a bug of ours: it fails the rows of that batch with 500, is logged with its traceback, and the
loop goes on with the next requests. Other work that must not race with forwards (attaching a
classifier's adapter, a classification batch) is queued as a call and runs between steps.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..core.errors import UniLoraError
from ..engine.routing import BASE
from .batch import RunningBatch, cache_argument
from .residency import Residency
from .sequence import Sequence
from ..store.source import AdapterStore

log = logging.getLogger("unilora.serve")


class Overloaded(UniLoraError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


class Worker:
    def __init__(self, residency: Residency | None, store: AdapterStore, tokenizer, *, max_batch: int,
                 max_queue: int, metrics=None, tokenizer_lock: threading.Lock | None = None):
        """`residency`: the causal LM and its adapters; None for a worker that only runs calls
        (the classifier server)."""
        self.residency = residency
        self.store = store
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.batch = RunningBatch(tokenizer.pad_token_id)
        if residency is not None:
            base = residency.base
            self.eos_ids = _eos_ids(tokenizer, base)
            self.batch.cache_argument = cache_argument(base)
            self.batch.device = next(base.parameters()).device
            self.keep_logits = "logits_to_keep" in _forward_parameters(base)
        self._pending: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable, Callable]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="unilora-worker", daemon=True)

    # --- from other threads ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, sequences: list[Sequence]) -> None:
        if self.residency is None:
            raise UniLoraError("this server runs no causal LM")  # a bug of ours: the app checks first
        with self._lock:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._pending) + len(sequences) > self.max_queue:
                raise Overloaded(f"the server is busy ({len(self._pending)} requests waiting); retry shortly")
            self._pending.extend(sequences)
            self._set_queue_depth()
        self._wake.set()

    def call(self, work: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        """Run `work()` on the worker thread between steps; `done(result, error)` gets the outcome."""
        with self._lock:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._calls) >= self.max_queue:
                raise Overloaded(f"the server is busy ({len(self._calls)} requests waiting); retry shortly")
            self._calls.append((work, done))
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Refuse new work, fail what still waits or runs after `timeout` seconds, end the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left = list(self._pending) + list(self.batch.sequences)
            calls = list(self._calls)
            self._pending.clear()
            self._calls.clear()
        for seq in left:
            seq.fail(503, "the server shut down before this request finished")
        for _, done in calls:
            done(None, Overloaded("the server shut down before this request finished"))

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._calls)

    # --- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._pending and not self._calls and not len(self.batch)
                if self._stopping and idle:
                    return
            if idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with torch.no_grad():  # not inference_mode: adapters attached here must stay ordinary tensors
                    self._run_calls()
                    self._admit()
                    if len(self.batch):
                        self._advance(self.batch.sequences, self.batch.step(self.residency.served))
                        self._drop_finished()
            except Exception as err:  # a bug of ours: fail this batch, keep serving the next ones
                log.exception("generation step failed")
                for seq in self.batch.sequences:
                    seq.fail(500, f"internal error while generating ({type(err).__name__}); see the server log")
                self.batch.keep([])

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                work, done = self._calls.popleft()
            try:
                result = work()
            except BaseException as err:
                done(None, err)
            else:
                done(result, None)

    def _admit(self) -> None:
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch - len(self.batch)))]
            self._set_queue_depth()
        admitted, rows = [], []
        now = time.monotonic()
        for seq in taken:
            if seq.cancelled.is_set():
                seq.finish_reason = "cancelled"
                continue
            if now > seq.deadline:
                seq.fail(504, "the request timed out waiting for a free slot")
                continue
            try:
                rows.append(self._row_of(seq))
            except UniLoraError as err:
                seq.fail(getattr(err, "status", 422), str(err))
                continue
            admitted.append(seq)
        if not admitted:
            return
        self.residency.trim(set(self.batch.rows) | set(rows))
        logits = self.batch.prefill(self.residency.served, admitted, rows, self.keep_logits)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in admitted))
        self._advance(admitted, logits)
        self._drop_finished()

    def _row_of(self, seq: Sequence) -> str:
        """The internal adapter name a request's rows run (attaching its adapter if needed)."""
        if seq.adapter is None:
            return BASE
        adapter, signature = seq.adapter_file, seq.signature
        seq.adapter_file = None  # the resident copy is what counts from here
        if adapter is None and self.residency.signature_of(seq.adapter) != signature:
            adapter, signature = self.store.read(seq.adapter)  # evicted since the request looked
        return self.residency.acquire(seq.adapter, adapter, signature)

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        now = time.monotonic()
        with self.tokenizer_lock:
            produced = self._take_tokens(sequences, logits, now)
        if self.metrics is not None and produced:
            self.metrics.generated_tokens.inc(produced)

    def _take_tokens(self, sequences: list[Sequence], logits: torch.Tensor, now: float) -> int:
        produced = 0
        for seq, row in zip(sequences, logits):
            if seq.finished:
                continue
            if seq.cancelled.is_set():
                seq.finish_reason = "cancelled"
            elif now > seq.deadline:
                seq.fail(504, "the request timed out; ask for fewer tokens or raise the server's --request-timeout")
            else:
                first = seq.first_token_at is None
                seq.advance(seq.choose(row), self.tokenizer, self.eos_ids)
                produced += 1
                if first and self.metrics is not None:
                    self.metrics.time_to_first_token.observe(seq.first_token_at - seq.submitted)
        return produced

    def _drop_finished(self) -> None:
        kept = [i for i, seq in enumerate(self.batch.sequences) if not seq.finished]
        if len(kept) < len(self.batch):
            self.batch.keep(kept)
            if self.residency.retired:
                self.residency.trim(set(self.batch.rows))
        if self.metrics is not None:
            self.metrics.running_rows.set(len(self.batch))

    def _set_queue_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending) + len(self._calls))


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _eos_ids(tokenizer, model) -> set[int]:
    """Every token that ends a generation: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}
