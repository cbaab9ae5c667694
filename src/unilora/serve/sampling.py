"""How the next token is chosen: a request's sampling settings, checked against the server's limits
and the model's context, and the choice itself from one row's logits.

The choice follows OpenAI's definitions: `logit_bias` is added to the logits; each token already
generated lowers its logit by `frequency_penalty` per occurrence plus `presence_penalty` once; then
greedy (temperature 0) or sampling with temperature and top-p. Log-probabilities, where asked for,
are those of the model's own distribution (the logits before bias, penalties and temperature).
"""

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    top_logprobs: int | None = None  # None: no log-probabilities; k: each token's and its k most likely

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)

    def adjusted(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """The logits with the bias and the penalties applied (the same tensor when there are none)."""
        if self.logit_bias:
            logits = logits.clone()
            ids, biases = zip(*self.logit_bias)
            logits[list(ids)] += torch.tensor(biases, dtype=logits.dtype)
        if generated and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1])[: logits.shape[-1]]
            logits = logits - self.frequency_penalty * counts - self.presence_penalty * (counts > 0)
        return logits

    def choose(self, logits: torch.Tensor, rng: torch.Generator | None, generated: list[int] = ()) -> int:
        """The next token from one row's float logits (vocabulary,) after `generated` tokens."""
        logits = self.adjusted(logits, list(generated))
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
                default_tokens: int | None, vocab_size: int | None = None) -> Sampling:
    """A request's sampling, its token budget checked against the server's limit and the context, and
    its logit_bias against the vocabulary."""
    limit = max_new_tokens_limit
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > limit:
        raise RequestError(400, f"'{field}' is {asked}, above this server's limit of {limit}")
    longest = max(prompt_lengths)
    room = (context - longest) if context else limit
    if room < 1:
        raise RequestError(400, f"the prompt has {longest} tokens, which fills the model's context of {context}")
    max_tokens = asked or min(default_tokens or limit, limit, room)
    if max_tokens > room:
        raise RequestError(400, f"the prompt ({longest} tokens) plus {field} ({max_tokens}) exceed the model's "
                                f"context of {context} tokens; ask for fewer tokens")
    biases = tuple(sorted((req.logit_bias or {}).items()))
    if vocab_size is not None and biases and biases[-1][0] >= vocab_size:
        raise RequestError(400, f"'logit_bias' names token {biases[-1][0]}, and this model's vocabulary has "
                                f"{vocab_size} tokens (0 to {vocab_size - 1})")
    return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    stop=tuple(req.stop or ()), presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, logit_bias=biases, top_logprobs=req.top_logprobs_asked())
