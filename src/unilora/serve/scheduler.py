"""Generation's scheduler: the sequences waiting for a row, the prompts being prefilled, the running
batch, and one turn of work under a token budget.

Each turn spends at most `max_iteration_tokens` tokens of forward work: first one decode step for
every running row (one token each), then prefill with what is left (at least a quarter of the
budget). Prompts that fit whole go first, several in one left-padded forward, so a short request is
never stuck behind a long one; then the oldest prompt that does not fit gets a chunk, and is
prefilled over several turns on its own cache (batch.PromptInProgress). A long prompt therefore
never stalls the running streams for more than one turn's budget, and a timeout or a disconnect
takes effect between chunks.

A request that arrives while others decode joins at the next turn (iteration-level scheduling), and
rows of any adapters, or of the base model, share every forward. A bad request fails alone.
Only the worker thread calls `turn` (worker.py); `submit` comes from request threads.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque

from ..core.errors import UniLoraError
from ..engine.routing import BASE
from .batch import PromptInProgress, RunningBatch, cache_argument
from .residency import Residency
from .sequence import Sequence


ALONE_FACTOR = 4  # a prompt being read while nothing else runs or waits: chunks this many budgets long


class Overloaded(UniLoraError):
    """The waiting queue is full, or the server is stopping (HTTP 503 with Retry-After)."""


def plan_prefill(prompts: list[PromptInProgress], budget: int) -> tuple[list[PromptInProgress], PromptInProgress | None, int]:
    """What one turn prefills with `budget` tokens: the prompts not yet started that fit whole (in
    arrival order, their padded width counted), and one prompt to advance by a chunk (the one under
    way, else the oldest left), with the chunk's length. A prompt under way keeps a quarter of the
    budget, so a stream of short prompts cannot starve it."""
    under_way = next((p for p in prompts if p.done), None)
    reserve = min(under_way.left, max(1, budget // 4)) if under_way is not None else 0
    room, whole, width = budget - reserve, [], 0
    for prompt in prompts:
        if prompt.done == 0 and max(width, prompt.left) * (len(whole) + 1) <= room:
            whole.append(prompt)
            width = max(width, prompt.left)
    room = budget - width * len(whole)
    chunked = under_way or next((p for p in prompts if p not in whole), None)
    if chunked is None or room <= 0:
        return whole, None, 0
    return whole, chunked, min(room, chunked.left)


class Scheduler:
    def __init__(self, residency: Residency, tokenizer, *, max_batch: int, max_queue: int,
                 max_iteration_tokens: int = 128, metrics=None,
                 tokenizer_lock: threading.Lock | None = None):
        self.residency = residency
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_iteration_tokens = max_iteration_tokens
        self.metrics = metrics
        base = residency.base
        self.eos_ids = eos_ids(tokenizer, base)
        self.batch = RunningBatch(tokenizer.pad_token_id, cache_argument(base), next(base.parameters()).device)
        self.prompts: list[PromptInProgress] = []  # admitted, attached, not yet all prefilled
        self._chunk_ran = False  # whether the last step read a chunk of a long prompt
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

    def unfinished(self) -> list[Sequence]:
        """Every sequence the server still owes an answer: waiting, being prefilled, or decoding."""
        return [*self.pending(), *(p.sequence for p in self.prompts), *self.batch.sequences]

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def has_work(self) -> bool:
        return bool(self._pending) or bool(self.prompts) or bool(len(self.batch))

    # --- on the worker thread ------------------------------------------------------------------
    def turn(self) -> int:
        """One turn of generation; returns the tokens of forward work it spent (decode rows and prompt
        tokens read), what the budget has left goes to training (cotraining.py)."""
        decoded = 0
        if len(self.batch):
            decoded = len(self.batch)
            self._advance(self.batch.sequences, self.batch.step(self.residency.served))
            self._drop_finished()
        self._admit()
        if self.prompts:
            budget = max(self.max_iteration_tokens - decoded, max(1, self.max_iteration_tokens // 4))
            if not len(self.batch) and not self._pending:
                # prompts being read while nothing decodes or waits keep nobody waiting: larger chunks
                # run closer to a one-shot prefill's speed (small matrix products are slower per token);
                # whoever arrives waits one chunk
                budget = ALONE_FACTOR * self.max_iteration_tokens
            read = self._prefill(budget)
            self._count_turn(decoded, read)
            return decoded + read
        self._count_turn(decoded, 0)
        return decoded

    def _count_turn(self, decoded: int, read: int) -> None:
        if self.metrics is not None:
            self.metrics.worker_turns.inc()
            self.metrics.turn_tokens.labels("decode").inc(decoded)
            self.metrics.turn_tokens.labels("prefill").inc(read)

    def fail_running(self, status: int, message: str) -> None:
        """Fail every row of the running batch and every prompt being prefilled (a forward failed: a bug
        of ours)."""
        for seq in [*self.batch.sequences, *(p.sequence for p in self.prompts)]:
            seq.fail(status, message)
        self.batch.keep([])
        self.prompts = []

    def fail_all(self, status: int, message: str) -> None:
        """Fail every waiting, prefilling and running sequence (the server stops)."""
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

    def _still_wanted(self, seq: Sequence, now: float, waited: str) -> bool:
        """False, after ending it, for a sequence whose client left or whose time is up."""
        if seq.cancelled.is_set():
            seq.cancel_quietly()
        elif now > seq.deadline:
            seq.fail(504, f"the request timed out {waited}; ask for fewer tokens or raise the server's "
                          "--request-timeout")
        return not seq.finished

    def _admit(self) -> None:
        """Waiting sequences become prompts in progress while rows are free: their adapters attached."""
        free = self.max_batch - len(self.batch) - len(self.prompts)
        if free <= 0:
            return
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), free))]
        now = time.monotonic()
        for seq in taken:
            try:
                if self._still_wanted(seq, now, "waiting for a free slot"):
                    self.prompts.append(PromptInProgress(seq, self._row_of(seq)))
            except UniLoraError as err:
                seq.fail(getattr(err, "status", 422), str(err))
            finally:
                self._release(seq)
        if taken:
            self.residency.trim(set(self.batch.rows) | {p.row for p in self.prompts})

    def _prefill(self, budget: int) -> int:
        now = time.monotonic()
        self.prompts = [p for p in self.prompts if self._still_wanted(p.sequence, now, "while its prompt was read")]
        whole, chunked, n = plan_prefill(self.prompts, budget)
        model = self.residency.served
        read = 0
        if whole:
            logits = self.batch.prefill(model, [p.sequence for p in whole], [p.row for p in whole], self.keep_logits)
            read += sum(p.left for p in whole)
            self._count_prompt_tokens(sum(p.left for p in whole))
            self.prompts = [p for p in self.prompts if p not in whole]
            self._advance([p.sequence for p in whole], logits)
        # a step that reads new whole prompts leaves the chunk for the next one, unless the last step
        # left it too: new requests get their first token and their next step sooner, and the long
        # prompt still moves at least every other step
        if chunked is not None and whole and self._chunk_ran:
            chunked = None
        self._chunk_ran = chunked is not None
        if chunked is not None:
            logits = self.batch.prefill_chunk(model, chunked, n, self.keep_logits)
            read += n
            self._count_prompt_tokens(n)
            if logits is not None:
                self.prompts.remove(chunked)
                self._advance([chunked.sequence], logits)
        self._drop_finished()
        return read

    def _count_prompt_tokens(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(n)

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
                if seq.finished or not self._still_wanted(seq, now, "while generating"):
                    continue
                first = seq.first_token_at is None
                seq.advance(seq.choose(row), self.tokenizer, self.eos_ids, row)
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
                self.residency.trim(set(self.batch.rows) | {p.row for p in self.prompts})
        if self.metrics is not None:
            self.metrics.running_rows.set(len(self.batch))


def eos_ids(tokenizer, model) -> set[int]:
    """Every token that ends a generation: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}
