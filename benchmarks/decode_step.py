"""One decode step of the server's batch on SmolLM2-135M, side by side in one run: every row on the base
model, every row on one adapter, and each row on its own adapter (32 rows, 32 Uni-LoRA adapters on
q_proj and v_proj, rank 4, d = 23,040), with the same model object, cache length and inputs. The
adapted model is the one `unilora serve` runs (`adapter_names` per row); the plain model without
adapters is the floor.

Prints the median step time of each case over `--rounds` x `--steps` steps (after warm-up) and the
ratio to the plain model, and with `--profile` the operators that take the time (torch.profiler,
self CPU time). To compare with another version of the code, run it again with PYTHONPATH pointing
at that checkout's src/.

    python benchmarks/decode_step.py                 # about 1.5 minutes on 2 cores
    python benchmarks/decode_step.py --profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.cache_utils import DynamicCache

import unilora
from unilora.engine.routing import BASE
from unilora.models.backbones import load_causal_lm
from unilora.models.embedded_llm import EMBEDDED_LLM


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

    def __init__(self, forward, rows: int, prompt: int, vocab: int):
        self.forward, self.rows = forward, rows
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(100, vocab - 100, (rows, prompt), generator=generator)
        self.mask = torch.ones_like(ids)
        with torch.no_grad():
            out = forward(input_ids=ids, attention_mask=self.mask, use_cache=True, past_key_values=DynamicCache(),
                          logits_to_keep=1)
        self.cache, self.last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> float:
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

    def plain(**kw):  # the same model with every adapter layer bypassed
        with model.disable_adapter():
            return model(**kw)

    cases = {
        "plain (adapters disabled)": plain,
        "every row on the base model": lambda **kw: model(adapter_names=[BASE] * args.rows, **kw),
        "every row on one adapter": lambda **kw: model(adapter_names=["a0"] * args.rows, **kw),
        "each row on its own adapter": lambda **kw: model(adapter_names=[f"a{i}" for i in range(args.rows)], **kw),
    }
    # each case decodes its batch alone, as the server's one batch does (a layer keeps the factors of the
    # last mix it ran); the cases take turns round by round, so that the machine's drift reaches each alike
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, forward in cases.items():
            batch = Decoding(forward, args.rows, args.prompt, vocab)
            times[name] += [batch.step() for _ in range(args.steps)][2:]  # the first steps warm the caches
    floor = statistics.median(times["plain (adapters disabled)"])
    result = {name: {"step_ms": round(1000 * statistics.median(t), 1), "over_plain": round(statistics.median(t) / floor, 3)}
              for name, t in times.items()}
    print(json.dumps({"rows": args.rows, "cache_tokens": args.prompt + args.steps, "cases": result}, indent=1))
    if args.profile:
        for name, forward in list(cases.items())[1:]:
            batch = Decoding(forward, args.rows, args.prompt, vocab)
            batch.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(8):
                    batch.step()
            print(f"\n== {name} (8 decode steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
