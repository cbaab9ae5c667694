"""Generation speed on SmolLM2-135M-Instruct: the base model, an unmerged adapter, the same inside
`model.merged_copies()` (one product per layer with W + s·B A, the base weights untouched; the block
stays open for the whole run, the copies' one-time build is timed apart) and the merged model.

The models, in one process, take turns (a seeded random order every round): each generates
`--new-tokens` tokens greedily (EOS ignored, so every round does the same work) from the same
prompt. Tokens/s is new tokens over wall time (prefill included); speed ratios to the base model
(base time / this model's time) are taken per round and reported as their median with a 95% bootstrap interval.

    python benchmarks/generation.py                       # CPU, Uni-LoRA on all linear layers
    python benchmarks/generation.py --method vblora --targets q_proj,v_proj

PEFT's LoRA (same layers, same rank, unmerged) runs beside them as the peer's reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import paired_ratio  # noqa: E402

import unilora  # noqa: E402
from unilora.models.backbones import load_causal_lm  # noqa: E402
from unilora.training.recipes import METHOD_DEFAULTS  # noqa: E402


def build(method: str, targets, seed: int = 0, peft_reference: bool = True):
    tokenizer, base = load_causal_lm("SmolLM2-135M-Instruct")
    base.eval()
    options = {k: v for k, v in METHOD_DEFAULTS[method].items() if k != "vector_length"}
    config = unilora.AdapterConfig(method=method, target_modules=targets, seed=seed, **options)
    unmerged = unilora.get_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():  # a trained-looking adapter: nonzero everywhere (speed does not depend on values)
        for p in unmerged.projection.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    merged = copy.deepcopy(unmerged)
    merged.merge()
    models = {"base": base, "unmerged": unmerged, "unmerged, merged copies": copy.deepcopy(unmerged), "merged": merged}
    if peft_reference:  # PEFT's LoRA on the same layers at the same rank, unmerged: the peer's overhead
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=targets, init_lora_weights=False)
        models["PEFT LoRA unmerged"] = get_peft_model(copy.deepcopy(base), lora).eval()
    return tokenizer, models


@torch.no_grad()
def timed_generate(model, ids, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="unilora", choices=unilora.METHODS)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    tokenizer, models = build(args.method, targets)
    base = models["base"]
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    ids = tokenizer([prompt] * args.batch, return_tensors="pt")["input_ids"]
    times = {name: [] for name in models}
    with_copies = models["unmerged, merged copies"]
    with contextlib.ExitStack() as block:
        block.enter_context(with_copies.merged_copies())
        build_seconds = timed_generate(with_copies, ids, 1) - timed_generate(with_copies, ids, 1)
        copies_mb = sum(m.merged_copy.built[-1].nbytes for m in with_copies.modules()
                        if getattr(m, "merged_copy", None) is not None and m.merged_copy.built is not None) / 2**20
        for i in range(args.warmup + args.rounds):
            for name in random.Random(i).sample(list(models), len(models)):
                elapsed = timed_generate(models[name], ids, args.new_tokens)
                if i >= args.warmup:
                    times[name].append(elapsed)
    machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M-Instruct, {args.method} on {args.targets}, batch {args.batch}, prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds after {args.warmup} warm-up; {machine}; "
          f"torch {torch.__version__}\n")
    print("| model | tokens/s (median) | speed / base model |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        rate = args.batch * args.new_tokens / statistics.median(values)
        median, low, high = paired_ratio(times["base"], values)  # per round: base time / this model's time
        print(f"| {name} | {rate:.1f} | {median:.3f} [{low:.3f}, {high:.3f}] |")
    model_mb = sum(p.nbytes for p in base.parameters()) / 2**20
    print(f"\nmerged copies: {copies_mb:.0f} MB beside the model's {model_mb:.0f} MB; building them (the first forward "
          f"in the block, less a second one): {build_seconds:.2f} s")


if __name__ == "__main__":
    main()
