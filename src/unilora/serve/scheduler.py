"""Generation's scheduler: the sequences waiting for a row, the running batch, and one turn of work.

Each turn (1) attaches the adapters the waiting sequences name and prefills them into the running
batch, as far as `max_batch` allows, then (2) runs one decode step for every row. A request that
arrives while others decode therefore joins at the next turn (iteration-level scheduling), and rows
of any adapters, or of the base model, share every forward.

A bad request fails alone; a timed-out or cancelled (disconnected) sequence leaves the batch at the
next turn. Only the worker thread calls `turn` (worker.py); `submit` comes from request threads.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque

from ..core.errors import UniLoraError
from ..engine.routing import BASE
from .batch import RunningBatch, cache_argument
from .residency import Residency
from .sequence import Sequence


class Overloaded(UniLoraError):
    """The waiting queue is full, or the server is stopping (HTTP 503 with Retry-After)."""


class Scheduler:
    def __init__(self, residency: Residency, tokenizer, *, max_batch: int, max_queue: int, metrics=None,
                 tokenizer_lock: threading.Lock | None = None):
        self.residency = residency
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        base = residency.base
        self.eos_ids = eos_ids(tokenizer, base)
        self.batch = RunningBatch(tokenizer.pad_token_id, cache_argument(base), next(base.parameters()).device)
        self.keep_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._pending: deque[Sequence] = deque()
        self._lock = threading.Lock()

    # --- from request threads ----------------------------------------------------------------
    def submit(self, sequences: list[Sequence]) -> None:
        with self._lock:
            if len(self._pending) + len(sequences) > self.max_queue:
                raise Overloaded(f"the server is busy ({len(self._pending)} requests waiting); retry shortly")
            self._pending.extend(sequences)

    def pending(self) -> list[Sequence]:
        with self._lock:
            return list(self._pending)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def has_work(self) -> bool:
        return bool(self._pending) or bool(len(self.batch))

    # --- on the worker thread ------------------------------------------------------------------
    def turn(self) -> None:
        self._admit()
        if len(self.batch):
            self._advance(self.batch.sequences, self.batch.step(self.residency.served))
            self._drop_finished()

    def fail_running(self, status: int, message: str) -> None:
        """Fail every row of the running batch (a forward failed: a bug of ours)."""
        for seq in self.batch.sequences:
            seq.fail(status, message)
        self.batch.keep([])

    def fail_all(self, status: int, message: str) -> None:
        """Fail every waiting and running sequence (the server stops)."""
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
        for seq in waiting:
            self._release(seq)
            seq.fail(status, message)
        self.fail_running(status, message)

    def _release(self, seq: Sequence) -> None:
        """A sequence leaves the waiting queue: the hold its prepared adapter took ends."""
        if seq.adapter is not None and seq.adapter.file is None:
            self.residency.release(seq.adapter.name)

    def _admit(self) -> None:
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch - len(self.batch)))]
        admitted, rows = [], []
        now = time.monotonic()
        for seq in taken:
            try:
                if seq.cancelled.is_set():
                    seq.cancel_quietly()
                elif now > seq.deadline:
                    seq.fail(504, "the request timed out waiting for a free slot")
                else:
                    rows.append(self._row_of(seq))
                    admitted.append(seq)
            except UniLoraError as err:
                seq.fail(getattr(err, "status", 422), str(err))
            finally:
                self._release(seq)
        if not admitted:
            return
        self.residency.trim(set(self.batch.rows) | set(rows))
        logits = self.batch.prefill(self.residency.served, admitted, rows, self.keep_logits)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in admitted))
        self._advance(admitted, logits)
        self._drop_finished()

    def _row_of(self, seq: Sequence) -> str:
        """The internal adapter name a sequence's row runs (attaching what was prepared for it)."""
        if seq.adapter is None:
            return BASE
        return self.residency.acquire(seq.adapter.name, seq.adapter.file, seq.adapter.signature)

    def _advance(self, sequences: list[Sequence], logits) -> None:
        now = time.monotonic()
        produced = 0
        with self.tokenizer_lock:
            for seq, row in zip(sequences, logits):
                if seq.finished:
                    continue
                if seq.cancelled.is_set():
                    seq.cancel_quietly()
                elif now > seq.deadline:
                    seq.fail(504, "the request timed out; ask for fewer tokens or raise the server's --request-timeout")
                else:
                    first = seq.first_token_at is None
                    seq.advance(seq.choose(row), self.tokenizer, self.eos_ids)
                    produced += 1
                    if first and self.metrics is not None:
                        self.metrics.time_to_first_token.observe(seq.first_token_at - seq.submitted)
        if self.metrics is not None and produced:
            self.metrics.generated_tokens.inc(produced)

    def _drop_finished(self) -> None:
        kept = [i for i, seq in enumerate(self.batch.sequences) if not seq.finished]
        if len(kept) < len(self.batch):
            self.batch.keep(kept)
            if self.residency.retired:
                self.residency.trim(set(self.batch.rows))
        if self.metrics is not None:
            self.metrics.running_rows.set(len(self.batch))


def eos_ids(tokenizer, model) -> set[int]:
    """Every token that ends a generation: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}
