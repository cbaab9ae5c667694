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
that take the time (torch.profiler, self CPU time). To compare with another version of the code,
run it again with PYTHONPATH pointing at that checkout's src/.

    python benchmarks/decode_step.py                 # about 2 minutes on 2 cores
    python benchmarks/decode_step.py --profile
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
from torch.profiler import ProfilerActivity, profile
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from generation_overhead import median_interval  # noqa: E402

import unilora  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="the cases run in turn this many times (noise)")
    parser.add_argument("--theta-dim", type=int, default=23_040)
    parser.add_argument("--profile", action="store_true")
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
