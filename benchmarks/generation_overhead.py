"""Where batch-1 unmerged generation's extra time goes, on SmolLM2-135M-Instruct with Uni-LoRA on all
210 linear layers: the base model, the adapted model, and the adapted model whose layers run every
step of their forward but the adapter's two products (module call, routing, factor lookup: the
Python path alone). The three take turns in a seeded order; ratios are base time / this time per
round, median. Then one adapted layer's update alone, eager against `torch.compile`.

    python benchmarks/generation_overhead.py --tokens 32 --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F

import unilora
from unilora.engine import layers
from unilora.models.backbones import load_causal_lm
from unilora.models.embedded_llm import EMBEDDED_LLM
from unilora.training.recipes import METHOD_DEFAULTS


def without_products(self, x, *args, **kwargs):
    """AdaptedLayer.forward up to the products: what is left is the Python path's cost."""
    result = self.base_layer(x, *args, **kwargs)
    router = self._router
    if self.merged_adapter is not None or not router.enabled or (router.mixing and router.rows() is not None):
        return result
    entry = self.adapters.get(router.active)
    a, bt = entry.binder.factors(entry.slot)
    if not torch.is_grad_enabled() and a.dtype == x.dtype == result.dtype and result.is_contiguous():
        result.view(-1, result.shape[-1]), x.reshape(-1, x.shape[-1])
    return result


def per_call_us(function, calls: int = 5000) -> float:
    for _ in range(50):
        function()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, base = load_causal_lm(EMBEDDED_LLM)
    base.eval()
    options = {k: v for k, v in METHOD_DEFAULTS["unilora"].items() if k != "vector_length"}
    model = unilora.get_model(copy.deepcopy(base), unilora.AdapterConfig(
        method="unilora", target_modules="all-linear", **options)).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog and", return_tensors="pt").input_ids

    def generate(m) -> float:
        started = time.perf_counter()
        m.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                   pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - started

    def python_path_only() -> float:
        forward = layers.AdaptedLayer.forward
        layers.AdaptedLayer.forward = without_products
        try:
            return generate(model)
        finally:
            layers.AdaptedLayer.forward = forward

    cases = {"base model": lambda: generate(base), "adapted": lambda: generate(model),
             "adapted, products skipped": python_path_only}
    times = {name: [] for name in cases}
    with torch.no_grad():
        for case in cases.values():
            case()
        order = random.Random(0)
        for _ in range(args.rounds):
            for name in order.sample(list(cases), len(cases)):
                times[name].append(cases[name]())
    print(f"batch 1, {args.tokens} new tokens, {args.rounds} rounds, 2 threads, torch {torch.__version__}")
    for name, taken in times.items():
        ratio = statistics.median(b / t for b, t in zip(times["base model"], taken))
        print(f"| {name} | {statistics.median(taken) / args.tokens * 1000:.1f} ms/token | {ratio:.3f} |")

    x, result = torch.randn(1, 1, 576), torch.randn(1, 1, 576)
    a, bt = torch.randn(4, 576), torch.randn(4, 576)

    def update(x, result, a, bt):
        flat = result.view(-1, result.shape[-1])
        return flat.addmm(F.linear(x.reshape(-1, x.shape[-1]), a), bt, alpha=2.0).view(result.shape)

    compiled = torch.compile(update, dynamic=False)
    with torch.no_grad():
        compiled(x, result, a, bt)
        print(f"one layer's update (576 -> r=4 -> 576): eager {per_call_us(lambda: update(x, result, a, bt)):.1f} us, "
              f"compiled {per_call_us(lambda: compiled(x, result, a, bt)):.1f} us per call")


if __name__ == "__main__":
    main()
