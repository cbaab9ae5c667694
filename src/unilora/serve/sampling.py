"""How the next token is chosen: a request's sampling settings, checked against the server's limits
and the model's context, and the choice itself from one row's logits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .protocol import RequestError

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


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

    def choose(self, logits: torch.Tensor, rng: torch.Generator | None) -> int:
        """The next token from one row's float logits (vocabulary,)."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # keeps at least the top token
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=rng))


def sampling_of(req, max_new_tokens_limit: int, context: int | None, prompt_lengths: list[int],
                default_tokens: int | None) -> Sampling:
    """A request's sampling, its token budget checked against the server's limit and the context."""
    limit = max_new_tokens_limit
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > limit:
        raise RequestError(400, f"'max_tokens' is {asked}, above this server's limit of {limit}")
    longest = max(prompt_lengths)
    room = (context - longest) if context else limit
    if room < 1:
        raise RequestError(400, f"the prompt has {longest} tokens, which fills the model's context of {context}")
    max_tokens = asked or min(default_tokens or limit, limit, room)
    if max_tokens > room:
        raise RequestError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                                f"context of {context} tokens; ask for fewer tokens")
    return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    stop=tuple(req.stop or ()))
