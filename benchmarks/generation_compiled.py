"""Does compiling the decode step bring an unmerged update within 2 % of the base? Batch-1 decoding
on SmolLM2-135M-Instruct, eager and `torch.compile` (dynamic=False, a static KV cache), of the base
model and of the leanest unmerged update on all 210 linear layers: plain modules that add
s·B(A x) with fixed random factors of rank 4 to the base product, no routing and no lookup, so
the compiler sees the whole step. What the library's own layers could reach if their routing were
written to be traced is at most this.

The four cases decode their own sequence, each with its own cache, and take turns token by token in
a seeded order (the machine's drift cancels); each compiled case compiles on its first decode step,
not timed. Prints each case's median ms per token and the medians of per-token time ratios with 95%
bootstrap intervals.

    python benchmarks/generation_compiled.py              # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).parent))
from generation_overhead import median_interval  # noqa: E402

from unilora.models.backbones import load_causal_lm  # noqa: E402
from unilora.models.embedded_llm import EMBEDDED_LLM  # noqa: E402


class LeanUpdate(nn.Module):
    """A linear layer plus s·B(A x) with fixed factors: nothing but tensors for the compiler."""

    def __init__(self, base: nn.Linear, rank: int, seed: int, scaling: float = 2.0):
        super().__init__()
        self.base, self.scaling = base, scaling
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(rank, base.in_features, generator=generator) * 0.01)
        self.register_buffer("b", torch.randn(base.out_features, rank, generator=generator) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scaling


def with_lean_updates(model: nn.Module, rank: int) -> tuple[nn.Module, int]:
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for seed, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LeanUpdate(model.get_submodule(name), rank, seed))
    return model, len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per case")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, base = load_causal_lm(EMBEDDED_LLM)
    base.eval().requires_grad_(False)
    adapted, layers = with_lean_updates(base, args.rank)
    ids = tokenizer("The quick brown fox jumps over the lazy dog and", return_tensors="pt").input_ids
    prompt = ids.shape[1]
    cases = {  # name: (the eager model, which prefills and owns the cache; what runs the decode steps)
        "base, eager": (base, base),
        "lean update, eager": (adapted, adapted),
        "base, compiled": (base, torch.compile(base, dynamic=False)),
        "lean update, compiled": (adapted, torch.compile(adapted, dynamic=False)),
    }
    state = {}

    def step(name: str) -> float:
        cache, last, position = state[name]
        started = time.perf_counter()
        out = cases[name][1](input_ids=last, past_key_values=cache, cache_position=torch.tensor([position]),
                             use_cache=True)
        taken = time.perf_counter() - started
        state[name] = (cache, out.logits[:, -1:].argmax(-1), position + 1)
        return taken

    compile_s = {}
    with torch.no_grad():
        for name, (eager, _) in cases.items():
            cache = StaticCache(config=eager.config, max_cache_len=prompt + args.tokens + 4)
            out = eager(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt), use_cache=True)
            state[name] = (cache, out.logits[:, -1:].argmax(-1), prompt)
        for name in cases:  # two untimed steps each: the compiled cases compile on the first
            started = time.perf_counter()
            step(name)
            step(name)
            compile_s[name] = round(time.perf_counter() - started, 1)
        times = {name: [] for name in cases}
        order = random.Random(0)
        for _ in range(args.tokens - 2):
            for name in order.sample(list(cases), len(cases)):
                times[name].append(step(name))
    print(f"{layers} linear layers adapted, rank {args.rank}; {len(times['base, eager'])} tokens per case")
    for name, taken in times.items():
        print(f"{name:22s} {1000 * statistics.median(taken):6.1f} ms/token   first two steps {compile_s[name]} s")
    for reference, case in [("base, eager", "lean update, eager"), ("base, compiled", "lean update, compiled"),
                            ("base, eager", "lean update, compiled"), ("base, eager", "base, compiled")]:
        ratios = [a / b for a, b in zip(times[reference], times[case])]  # per token: the case's speed over the reference's
        print(f"{case} over {reference} (speed): median [95% interval] "
              f"{[round(v, 3) for v in median_interval(ratios)]}")


if __name__ == "__main__":
    main()
