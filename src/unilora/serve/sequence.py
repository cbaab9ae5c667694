"""One generation in flight: its prompt, its sampling settings, the text it has produced, and
where its events go.

The worker thread advances a `Sequence` one token at a time; the HTTP side reads its events from
`sink`, a callable that hands them across threads. Events are tuples:

- ("text", delta): new text, held back while it may still become a stop string or ends inside a
  multi-byte character;
- ("done", finish_reason, usage): "stop" (end-of-sequence token or a stop string) or "length";
- ("error", status, message): the request failed (bad adapter, timeout, overload); the others in
  the batch go on.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


@dataclass(eq=False)
class Sequence:
    adapter: str | None  # a store name; None: the base model
    prompt_ids: list[int]
    sampling: Sampling
    sink: Callable[[tuple], None]
    deadline: float  # time.monotonic() after which the request times out
    index: int = 0  # its place among the prompts of one request
    adapter_file: object = None  # an AdapterFile read for this request when not resident
    signature: object = None  # the store signature the request was checked against
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finish_reason: str | None = None
    _sent: int = 0
    _rng: torch.Generator | None = None

    def __post_init__(self):
        self._rng = self.sampling.generator()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, status: int, message: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.sink(("error", status, message))

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's float logits (vocabulary,)."""
        s = self.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # keeps at least the top token
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._rng))

    def advance(self, token: int, tokenizer, eos_ids: set[int]) -> None:
        """Take one new token: send the text it completes, and finish on end-of-sequence, a stop
        string or the token budget."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token)
        finish = None
        if token in eos_ids:
            finish = "stop"
            kept = self.generated[:-1]
        else:
            kept = self.generated
        text = tokenizer.decode(kept, skip_special_tokens=True)
        stop_at = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            text, finish = text[:stop_at], "stop"
        elif finish is None and len(self.generated) >= self.sampling.max_tokens:
            finish = "length"
        end = len(text) if finish else len(text) - self._held_back(text)
        if end > self._sent:
            self.sink(("text", text[self._sent:end]))
            self._sent = end
        if finish:
            self.finish_reason = finish
            self.sink(("done", finish, {"prompt_tokens": len(self.prompt_ids),
                                        "completion_tokens": len(self.generated)}))

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not to send yet: an unfinished character, or the
        start of a stop string."""
        if text.endswith("\ufffd"):
            return len(text) - self._sent
        longest = 0
        for stop in self.sampling.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
