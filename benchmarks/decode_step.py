"""One decode step of the server's batch on SmolLM2-135M, side by side in one run: every row on the
base model, every row on one adapter, and each row on its own adapter (32 rows, 32 Uni-LoRA adapters
on q_proj and v_proj, rank 4, d = 23,040), the last also with a one-row prompt on one adapter run
(untimed) before each step, as a server prefills a new request between two steps of its batch; each
case on its own copy of the model, with the same cache length and inputs. The adapted model is the
one `unilora serve` runs (`adapter_names` per row); the same model with its adapters disabled is the
floor.

Each case decodes its own batch, and the cases take turns step by step (a fresh random order each
step), so that every step gives one time ratio per case measured within a second and the machine's
drift cancels. Prints each case's median step time and the median of its per-step ratios to the
plain model and to one adapter, with 95% bootstrap intervals; with `--profile` also the operators
that take the time (torch.profiler, self CPU time); with `--layer-times` the time one adapted layer
spends on the adapters (the mixed path after the base product, and the factor bank's lookup alone),
and one layer's products on 32 rows with cold caches. To compare with another version of the code,
run it again with PYTHONPATH pointing at that checkout's src/.

    python benchmarks/decode_step.py                 # about 2 minutes on 2 cores
    python benchmarks/decode_step.py --profile
    python benchmarks/decode_step.py --layer-times   # about 1 minute
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from generation_overhead import median_interval, per_call_us  # noqa: E402

import unilora  # noqa: E402
from unilora.engine.factor_bank import FactorBank  # noqa: E402
from unilora.engine.layers import AdaptedLayer  # noqa: E402
from unilora.engine.routing import BASE  # noqa: E402
from unilora.models.backbones import load_causal_lm  # noqa: E402
from unilora.models.embedded_llm import EMBEDDED_LLM  # noqa: E402


def adapted_model(count: int, theta_dim: int):
    tokenizer, base = load_causal_lm(EMBEDDED_LLM)
    base.eval().requires_grad_(False)
    config = unilora.AdapterConfig(method="unilora", target_modules=["q_proj", "v_proj"], rank=4,
                                   theta_dim=theta_dim, seed=0)
    model = unilora.get_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        for param in model.projections[f"a{i}"].parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return tokenizer, base, model.eval()


class Decoding:
    """One case's batch: `rows` prompts of `prompt` tokens prefilled, then one decode step per call."""

    def __init__(self, forward, rows: int, prompt: int, vocab: int, between=None):
        self.forward, self.rows, self.between = forward, rows, between  # between: run before each step, untimed
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(100, vocab - 100, (rows, prompt), generator=generator)
        self.mask = torch.ones_like(ids)
        with torch.no_grad():
            out = forward(input_ids=ids, attention_mask=self.mask, use_cache=True, past_key_values=DynamicCache(),
                          logits_to_keep=1)
        self.cache, self.last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> float:
        if self.between is not None:
            with torch.no_grad():
                self.between()
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        with torch.no_grad():
            started = time.perf_counter()
            out = self.forward(input_ids=self.last, attention_mask=self.mask, position_ids=positions, use_cache=True,
                               past_key_values=self.cache, logits_to_keep=1)
            elapsed = time.perf_counter() - started
        self.cache, self.last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return elapsed


def layer_times(cases: dict, rows: int, prompt: int, vocab: int, rounds: int = 8, steps: int = 12) -> dict:
    """Microseconds per layer call of the adapters' part of a mixed forward (AdaptedLayer._mixed_forward,
    after the base product) and of the factor bank's lookup (FactorBank.row_factors), in decode steps
    of each case: the median over `rounds` fresh batches of each round's mean."""
    wrapped = {"mixed path": (AdaptedLayer, "_mixed_forward"), "factor bank lookup": (FactorBank, "row_factors")}
    spent = {part: [0, 0] for part in wrapped}  # [nanoseconds, calls] since the last reset
    originals = {part: getattr(owner, name) for part, (owner, name) in wrapped.items()}

    def timed(part, function):
        def run(*args, **kwargs):
            started = time.perf_counter_ns()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part][0] += time.perf_counter_ns() - started
                spent[part][1] += 1
        return run

    for part, (owner, name) in wrapped.items():
        setattr(owner, name, timed(part, originals[part]))
    per_round = {name: {part: [] for part in wrapped} for name in cases}
    try:
        for _ in range(rounds):  # the cases in turn each round, so the machine's drift touches them alike
            for name, (forward, between) in cases.items():
                batch = Decoding(forward, rows, prompt, vocab, between)
                for _ in range(3):
                    batch.step()
                for part in wrapped:
                    spent[part] = [0, 0]
                for _ in range(steps):
                    batch.step()
                for part, (total, calls) in spent.items():
                    if calls:
                        per_round[name][part].append(total / calls / 1000)
    finally:
        for part, (owner, name) in wrapped.items():
            setattr(owner, name, originals[part])
    return {name: {part: round(statistics.median(v), 1) for part, v in parts.items() if v}
            for name, parts in per_round.items()}


def cold_products(rows: int = 32, features: int = 576, rank: int = 4, layers: int = 60) -> dict:
    """One q_proj-sized layer's adapter products on `rows` rows, median microseconds per call, each call
    right after 9 MB have been streamed through the caches (in the model the base weights do that
    between two adapted layers) and each on its own factors (as the model's 60 adapted layers have):
    one adapter's two products, 32 rows' batched products on their gathered factors, and only reading
    those gathered factors."""
    torch.manual_seed(0)
    x, result = torch.randn(rows, 1, features), torch.randn(rows, 1, features)
    one = [(torch.randn(rank, features), torch.randn(rank, features)) for _ in range(layers)]
    gathered = [(torch.randn(rows, rank, features), torch.randn(rows, rank, features)) for _ in range(layers)]
    streamed = torch.randn(9 * 1024 * 1024 // 4)
    sink = torch.empty_like(streamed)
    calls = {
        "one adapter: linear + addmm_": lambda i: result.view(rows, features).addmm_(
            F.linear(x.view(rows, features), one[i][0]), one[i][1]),
        f"{rows} adapters: bmm + baddbmm_": lambda i: result.baddbmm_(
            torch.bmm(x, gathered[i][0].transpose(1, 2)), gathered[i][1]),
        f"{rows} adapters' gathered factors, read only": lambda i: (gathered[i][0].sum(), gathered[i][1].sum()),
    }
    layer = [0]  # the factors the next call uses, set with the streaming before it

    def stream_then_pick(i: int) -> None:
        sink.copy_(streamed)
        layer[0] = i % layers

    with torch.no_grad():
        return {name: round(per_call_us(lambda: call(layer[0]), stream_then_pick, calls=5 * layers), 1)
                for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="the cases run in turn this many times (noise)")
    parser.add_argument("--theta-dim", type=int, default=23_040)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--layer-times", action="store_true",
                        help="only the adapters' time per layer call in each case, and one layer's products cold")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    _, base, model = adapted_model(args.rows, args.theta_dim)
    vocab = base.config.vocab_size

    # each case its own copy of the model: a layer keeps what it derives from the factors of the mixes
    # it ran, and cases taking turns on one model would undo each other's
    models = [model] + [copy.deepcopy(model) for _ in range(4)]
    own = [f"a{i}" for i in range(args.rows)]
    prompt = torch.randint(100, vocab - 100, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    prompts = itertools.count()

    def plain(**kw):  # the model with every adapter layer bypassed
        with models[0].disable_adapter():
            return models[0](**kw)

    def a_prompt_on_one_adapter():  # as a server prefills a new request between two steps of its batch
        models[4](input_ids=prompt, adapter_names=[own[next(prompts) % args.rows]], logits_to_keep=1)

    cases = {
        "plain (adapters disabled)": (plain, None),
        "every row on the base model": (lambda **kw: models[1](adapter_names=[BASE] * args.rows, **kw), None),
        "every row on one adapter": (lambda **kw: models[2](adapter_names=["a0"] * args.rows, **kw), None),
        "each row on its own adapter": (lambda **kw: models[3](adapter_names=own, **kw), None),
        "each row on its own adapter, a prompt on one adapter before each step (untimed)":
            (lambda **kw: models[4](adapter_names=own, **kw), a_prompt_on_one_adapter),
    }
    if args.layer_times:
        adapted = {name: cases[name] for name in ("every row on one adapter", "each row on its own adapter")}
        print(json.dumps({"rows": args.rows, "us_per_layer_call": layer_times(adapted, args.rows, args.prompt, vocab),
                          "one_layer_cold_us_per_call": cold_products(args.rows)}, indent=1))
        return
    # the cases take turns step by step, each on its own batch, in a fresh random order, so that every
    # step gives one ratio per case measured within a second and the machine's drift cancels
    times = {name: [] for name in cases}
    order = random.Random(0)
    for _ in range(args.rounds):
        batches = {name: Decoding(forward, args.rows, args.prompt, vocab, between)
                   for name, (forward, between) in cases.items()}
        for step in range(args.steps):
            for name in order.sample(list(cases), len(cases)):
                taken = batches[name].step()
                if step >= 2:  # the first steps warm the caches
                    times[name].append(taken)
        del batches
    floor, one = times["plain (adapters disabled)"], times["every row on one adapter"]
    result = {}
    for name, taken in times.items():
        result[name] = {"step_ms": round(1000 * statistics.median(taken), 1),
                        "over_plain": [round(v, 3) for v in median_interval([t / f for t, f in zip(taken, floor)])],
                        "over_one_adapter": [round(v, 3) for v in median_interval([t / o for t, o in zip(taken, one)])]}
    print(json.dumps({"rows": args.rows, "cache_tokens": args.prompt + args.steps, "steps_per_case": len(floor),
                      "time_ratios": "median [95% bootstrap interval] of per-step time ratios", "cases": result},
                     indent=1))
    if args.profile:
        for name, (forward, between) in list(cases.items())[1:]:
            batch = Decoding(forward, args.rows, args.prompt, vocab, between)
            batch.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(8):
                    batch.step()
            print(f"\n== {name} (8 decode steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
