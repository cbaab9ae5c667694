"""Where batch-1 unmerged generation's extra time goes, on SmolLM2-135M-Instruct with Uni-LoRA on all
210 linear layers. Each case decodes its own sequence with its own KV cache, and the cases take turns
token by token in a seeded order, so every token gives one ratio per case (plain base time / this
case's time) measured within a few hundred milliseconds: the machine's drift, which moves whole runs
by 5-15 %, cancels out. The cases:

- the base model (a plain copy, no wrapper);
- the adapted model with its adapters disabled (the wrapper modules' own cost);
- the adapted model;
- the adapted model inside `model.merged_copies()` (one product per layer with W + s·B A, the base
  weights untouched);
- the adapted model whose layers run every step of their forward but the adapter's products
  (module call, routing, factor lookup: the Python path);
- the leanest possible update: the base layer, then the two products as two calls on factors bound
  in advance (no routing, no lookup, no reshapes);
- the same with two trivial calls instead of the products (what any two calls cost here);
- a second copy of the base model (the control: what the same work in other memory measures).

Then one layer's two-call update alone, with the caches warm and after a base-sized weight has been
streamed through them (as in the model, where 540 MB of weights pass between two adapted layers).

    python benchmarks/generation_overhead.py --tokens 64 --sequences 5
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

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


def leanest_update(self, x, *args, **kwargs):
    """The base layer and the two products on factors bound beforehand (batch 1): the floor of any
    unmerged update that runs as separate calls."""
    result = self.base_layer(x, *args, **kwargs)
    a, bt, scaling = self._bound
    return result.baddbmm_(F.linear(x, a), bt, alpha=scaling)


def two_trivial_calls(self, x, *args, **kwargs):
    result = self.base_layer(x, *args, **kwargs)
    a, bt, _ = self._bound
    torch.neg(a), torch.neg(bt)
    return result


def bind_factors(model) -> None:
    router = model.router
    for module in model.modules():
        if isinstance(module, layers.AdaptedLayer):
            entry = module.adapters[router.active]
            a, bt = entry.binder.factors(entry.slot)
            object.__setattr__(module, "_bound", (a, bt.unsqueeze(0), entry.scaling))


def median_interval(ratios: list[float], seed: int = 0) -> tuple[float, float, float]:
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(1000))
    return statistics.median(ratios), medians[25], medians[974]


def per_call_us(function, before=None, calls: int = 2000) -> float:
    taken = []
    for i in range(calls):
        if before is not None:
            before(i)
        started = time.perf_counter()
        function()
        taken.append(time.perf_counter() - started)
    return statistics.median(taken) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per sequence")
    parser.add_argument("--sequences", type=int, default=5, help="sequences per case, each from the prompt")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, base = load_causal_lm(EMBEDDED_LLM)
    base.eval()
    options = {k: v for k, v in METHOD_DEFAULTS["unilora"].items() if k != "vector_length"}
    model = unilora.get_model(copy.deepcopy(base), unilora.AdapterConfig(
        method="unilora", target_modules="all-linear", **options)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # a trained adapter's θ, not the zero start
                parameter.normal_(0, 0.01)
    with_copies = copy.deepcopy(model)
    bind_factors(model)
    ids = tokenizer("The quick brown fox jumps over the lazy dog and", return_tensors="pt").input_ids

    forward = layers.AdaptedLayer.forward
    cases = {  # name: (model, AdaptedLayer.forward, adapters enabled)
        "base model": (base, forward, True),
        "adapted, adapters disabled": (model, forward, False),
        "adapted": (model, forward, True),
        "adapted, merged copies": (with_copies, forward, True),
        "adapted, products skipped": (model, without_products, True),
        "leanest update (two calls, factors bound)": (model, leanest_update, True),
        "two trivial calls instead of the products": (model, two_trivial_calls, True),
        "base model, a second copy": (copy.deepcopy(base), forward, True),
    }

    def step(name, tokens, cache):
        target, layer_forward, enabled = cases[name]
        layers.AdaptedLayer.forward = layer_forward
        model.router.enabled = enabled
        started = time.perf_counter()
        logits = target(tokens, past_key_values=cache, use_cache=True).logits
        return time.perf_counter() - started, logits[:, -1:].argmax(-1)

    times = {name: [] for name in cases}
    order = random.Random(0)
    try:
        with torch.no_grad(), with_copies.merged_copies():
            for _ in range(args.sequences):
                state = {}
                for name in cases:
                    cache = DynamicCache()
                    state[name] = (cache, step(name, ids, cache)[1])
                for _ in range(args.tokens):
                    for name in order.sample(list(cases), len(cases)):
                        cache, token = state[name]
                        taken, token = step(name, token, cache)
                        times[name].append(taken)
                        state[name] = (cache, token)
    finally:
        layers.AdaptedLayer.forward = forward
        model.router.enabled = True

    print(f"batch 1, {args.sequences} sequences x {args.tokens} tokens per case, decode steps in turn, "
          f"2 threads, torch {torch.__version__}")
    print("| case | ms/token (median) | base time / case time, per token: median [95% interval] |")
    print("| --- | ---: | ---: |")
    for name, taken in times.items():
        ratio, low, high = median_interval([b / t for b, t in zip(times["base model"], taken)])
        print(f"| {name} | {statistics.median(taken) * 1000:.1f} | {ratio:.3f} [{low:.3f}, {high:.3f}] |")

    x, a = torch.randn(1, 1, 576), torch.randn(4, 576)
    bt, result = torch.randn(1, 4, 576), torch.randn(1, 1, 576)
    weights = [torch.randn(1536, 576) for _ in range(64)]  # 226 MB, more than any cache

    def update():
        result.baddbmm_(F.linear(x, a), bt, alpha=2.0)

    def stream_a_weight(i):
        F.linear(x, weights[i % len(weights)])

    with torch.no_grad():
        warm, cold = per_call_us(update), per_call_us(update, before=stream_a_weight)
    print(f"one layer's two-call update (576 -> r=4 -> 576), median per call: caches warm {warm:.1f} us, "
          f"after a 3.5 MB weight streamed through them {cold:.1f} us")


if __name__ == "__main__":
    main()
