"""Many adapters on one base: bytes held and mixed-batch speed, ours beside PEFT 0.21.2's LoRA.

On the Llama-small shape (8 x 512, FFN 1536, vocabulary 32,000; q_proj/v_proj adapted):

- `--adapters` Uni-LoRA adapters (d = `--theta-dim`, rank 4, one seed, so they share one index
  vector) on one of our models, and as many PEFT LoRA r = 8 adapters on one PeftModel: the bytes
  each library holds for its adapters (distinct tensor storages, so shared parts count once),
  beside the bytes one adapter stores.
- Forward time of a batch of `--batch` rows x `--seq` tokens (logits at the last position only,
  as a generation prefill) where the rows use 1, 8 or 32 distinct adapters (`adapter_names`),
  for both libraries, and for each library's single-adapter unmerged forward of the same batch.
  All variants take turns in a new seeded order every round; ratios are per round, median with
  a 95% bootstrap interval (benchmarks/train_step.py: paired_ratio).

    python benchmarks/many_adapters.py                     # CPU, fp32, 1,000 adapters each
    python benchmarks/many_adapters.py --adapters 50 --rounds 3   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import build_base, paired_ratio  # noqa: E402

import unilora  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
DISTINCT = (1, 8, 32)


def distinct_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tensor shared by adapters counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def ours(base, count: int, theta_dim: int):
    config = unilora.AdapterConfig(method="unilora", target_modules=TARGETS, rank=4, theta_dim=theta_dim, seed=0)
    model = unilora.get_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for projection in model.projections.values():
            projection.theta_d.copy_(torch.randn(theta_dim, generator=generator) * 0.02)
    held = distinct_bytes([*model.projections.parameters(), *model.projections.buffers()])
    stored = model.stored_bytes()
    return model.eval(), held, stored


def peft(base, count: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    one = [p for n, p in model.named_parameters() if "lora_" in n and n.endswith(".a0.weight")]
    return model.eval(), distinct_bytes(lora), distinct_bytes(one)


def rows_over(adapters: int, batch: int, count: int) -> list[str]:
    """Row i uses one of `adapters` distinct adapters, spread over the resident ones."""
    names = [f"a{(j * (count // adapters)) % count}" for j in range(adapters)]
    return [names[i % adapters] for i in range(batch)]


@torch.no_grad()
def timed(model, ids, names) -> float:
    start = time.perf_counter()
    if names is None:
        model(input_ids=ids, logits_to_keep=1)
    else:
        model(input_ids=ids, logits_to_keep=1, adapter_names=names)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--theta-dim", type=int, default=23040)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    started = time.perf_counter()
    our_model, our_held, our_stored = ours(build_base("llama-small", torch.float32, "cpu", False), args.adapters,
                                           args.theta_dim)
    our_setup = time.perf_counter() - started
    started = time.perf_counter()
    peft_model, peft_held, peft_stored = peft(build_base("llama-small", torch.float32, "cpu", False), args.adapters)
    peft_setup = time.perf_counter() - started

    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    variants = {("ours", "single"): (our_model, None), ("peft", "single"): (peft_model, None)}
    for k in DISTINCT:
        names = rows_over(k, args.batch, args.adapters)
        variants[("ours", k)] = (our_model, names)
        variants[("peft", k)] = (peft_model, names)
    times = {key: [] for key in variants}
    for i in range(args.warmup + args.rounds):
        for key in random.Random(i).sample(list(variants), len(variants)):
            model, names = variants[key]
            elapsed = timed(model, ids, names)
            if i >= args.warmup:
                times[key].append(elapsed)

    machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"Llama-small (8 x 512, FFN 1536), q_proj/v_proj; {args.adapters:,} adapters per library; batch "
          f"{args.batch} x {args.seq} tokens, logits at the last position; {args.rounds} rounds after {args.warmup} "
          f"warm-up; {machine}; torch {torch.__version__}\n")
    print("| adapters resident | bytes held for adapters | one adapter's stored bytes | held / (count x stored) | "
          "setup seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {args.adapters:,} Uni-LoRA (ours, d = {args.theta_dim:,}) | {our_held:,} | {our_stored:,} | "
          f"{our_held / (args.adapters * our_stored):.3f} | {our_setup:.0f} |")
    print(f"| {args.adapters:,} LoRA r = 8 (PEFT) | {peft_held:,} | {peft_stored:,} | "
          f"{peft_held / (args.adapters * peft_stored):.3f} | {peft_setup:.0f} |\n")
    print("| rows use | ours: ms per batch | PEFT LoRA: ms per batch | ours / PEFT | ours / our single-adapter forward |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in ("single", *DISTINCT):
        mine, theirs = times[("ours", k)], times[("peft", k)]
        vs_peft = paired_ratio(mine, theirs)
        vs_single = paired_ratio(mine, times[("ours", "single")])
        label = "one active adapter (no adapter_names)" if k == "single" else f"{k} distinct adapter{'s' if k > 1 else ''}"
        print(f"| {label} | {1000 * statistics.median(mine):.0f} | {1000 * statistics.median(theirs):.0f} | "
              f"{vs_peft[0]:.3f} [{vs_peft[1]:.3f}, {vs_peft[2]:.3f}] | "
              f"{vs_single[0]:.3f} [{vs_single[1]:.3f}, {vs_single[2]:.3f}] |")


if __name__ == "__main__":
    main()
