"""One decode step of the server's batch on SmolLM2-135M, side by side in one run: every row on the base
model, every row on one adapter, and each row on its own adapter (32 rows, 32 Uni-LoRA adapters on
q_proj and v_proj, rank 4, d = 23,040), with the same model object, cache length and inputs. The
adapted model is the one `unilora serve` runs (`adapter_names` per row); the plain model without
adapters is the floor.

Prints the median step time of each case over `--steps` steps (after warm-up) and the ratio to the
plain model, and with `--profile` the operators that take the time (torch.profiler, self CPU time).

    python benchmarks/decode_step.py                 # about 2 minutes on 2 cores
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


def step_times(forward, rows: int, prompt: int, steps: int, vocab: int) -> tuple[list[float], object]:
    """Prefill `rows` prompts of `prompt` tokens, then time `steps` decode steps."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 100, (rows, prompt), generator=generator)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = forward(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=DynamicCache(),
                      logits_to_keep=1)
        cache, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            started = time.perf_counter()
            out = forward(input_ids=last, attention_mask=mask, position_ids=positions, use_cache=True,
                          past_key_values=cache, logits_to_keep=1)
            times.append(time.perf_counter() - started)
            cache, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return times, out


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
    tokenizer, base, model = adapted_model(args.rows, args.theta_dim)
    vocab = base.config.vocab_size
    cases = {
        "plain model (no adapters attached)": lambda **kw: model.base_model(**kw) if False else None,
    }
    # the plain model: the same weights with every adapter layer bypassed
    def plain(**kw):
        with model.disable_adapter():
            return model(**kw)

    cases = {
        "plain (adapters disabled)": plain,
        "every row on the base model": lambda **kw: model(adapter_names=[BASE] * args.rows, **kw),
        "every row on one adapter": lambda **kw: model(adapter_names=["a0"] * args.rows, **kw),
        "each row on its own adapter": lambda **kw: model(adapter_names=[f"a{i}" for i in range(args.rows)], **kw),
    }
    medians = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, forward in cases.items():
            times, _ = step_times(forward, args.rows, args.prompt, args.steps, vocab)
            medians[name].append(statistics.median(times[2:]))
    floor = statistics.median(medians["plain (adapters disabled)"])
    result = {name: {"step_ms": round(1000 * statistics.median(m), 1), "over_plain": round(statistics.median(m) / floor, 3)}
              for name, m in medians.items()}
    print(json.dumps({"rows": args.rows, "cache_tokens": args.prompt + args.steps, "cases": result}, indent=1))
    if args.profile:
        for name, forward in list(cases.items())[1:]:
            step_times(forward, args.rows, args.prompt, 4, vocab)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_times(forward, args.rows, args.prompt, 8, vocab)
            print(f"\n== {name} (prefill + 8 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
