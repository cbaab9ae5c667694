"""One generation in flight: its prompt, its sampling settings, the text it has produced, and
where its events go.

The worker thread advances a `Sequence` one token at a time; the HTTP side reads its events from
`sink`, a callable that hands them across threads. The events:

- `TextEvent`: new text, held back while it may still become a stop string or ends inside a
  multi-byte character, with the log-probabilities of the tokens it completes when they were asked for;
- `DoneEvent`: the generation ended, "stop" (end-of-sequence token or a stop string) or "length";
- `ErrorEvent`: the request failed (timeout, overload, shutdown, a bug of ours); the others in the
  batch go on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .adapters import PreparedAdapter
from .sampling import Sampling


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, and its most likely alternatives'."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextEvent:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # "stop" or "length"


@dataclass(frozen=True)
class ErrorEvent:
    status: int
    message: str


Event = Union[TextEvent, DoneEvent, ErrorEvent]


@dataclass(eq=False)
class Sequence:
    adapter: PreparedAdapter | None  # None: the base model
    prompt_ids: list[int]
    sampling: Sampling
    sink: Callable[[Event], None]
    deadline: float  # time.monotonic() after which the request times out
    index: int = 0  # its place among the prompts of one request
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finish_reason: str | None = None
    _sent: int = 0
    _rng: torch.Generator | None = None
    _unsent_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self):
        self._rng = self.sampling.generator()

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, status: int, message: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.sink(ErrorEvent(status, message))

    def cancel_quietly(self) -> None:
        """End a sequence whose client is gone: nobody reads its events."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's float logits (vocabulary,)."""
        return self.sampling.choose(logits, self._rng, self.generated)

    def advance(self, token: int, tokenizer, eos_ids: set[int], logits: torch.Tensor | None = None) -> None:
        """Take one new token: send the text it completes, and finish on end-of-sequence, a stop
        string or the token budget. `logits`: the row's, for the log-probabilities asked for."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token)
        if self.sampling.top_logprobs is not None and logits is not None and token not in eos_ids:
            self._unsent_logprobs.append(token_logprob(logits, token, self.sampling.top_logprobs, tokenizer))
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
            self.sink(TextEvent(text[self._sent:end], tuple(self._unsent_logprobs)))
            self._sent = end
            self._unsent_logprobs = []
        if finish:
            self.finish_reason = finish
            self.sink(DoneEvent(finish))

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


def token_logprob(logits: torch.Tensor, token: int, top: int, tokenizer) -> TokenLogprob:
    """`token`'s log-probability under the row's logits, and the `top` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = tuple((tokenizer.decode([int(i)]), float(v)) for v, i in zip(*best)) if best is not None else ()
    return TokenLogprob(tokenizer.decode([token]), float(logprobs[token]), alternatives)
