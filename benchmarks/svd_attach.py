"""What the SVD family's attach costs: the truncated SVD of every adapted weight, once per base model
and rank, on the embedded SmolLM2-135M-Instruct with all linear layers (210 layers: 30 blocks x q, k,
v, o, gate, up, down). Times the first adapter (the SVD), a second adapter on the same base (shared
factors, no SVD), and the bytes the frozen factors hold.

    python benchmarks/svd_attach.py [--ranks 2,8] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

import unilora
from unilora.models.backbones import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, lm = load_causal_lm("SmolLM2-135M-Instruct")
    print(f"torch {torch.__version__}, {args.threads} threads, SmolLM2-135M-Instruct, all linear layers")
    print("| method | rank | layers | first adapter (SVD) s | second adapter s | frozen factors MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method in ("lora_xs", "tinylora"):
        for rank in (int(r) for r in args.ranks.split(",")):
            config = unilora.AdapterConfig(method=method, rank=rank, target_modules="all-linear")
            started = time.perf_counter()
            model = unilora.get_model(lm, config)
            first = time.perf_counter() - started
            started = time.perf_counter()
            model.add_adapter("second", unilora.AdapterConfig(method=method, rank=rank, seed=1,
                                                              target_modules="all-linear"))
            second = time.perf_counter() - started
            projection = model.projections["default"]
            frozen = sum(b.numel() * b.element_size() for n, b in projection.named_buffers()
                         if n in projection.fixed_buffer_names())
            print(f"| {method} | {rank} | {len(model.layout)} | {first:.2f} | {second:.3f} | {frozen / 2**20:.1f} |")
            # both adapters are untrained (ΔW = 0): the base comes back unchanged, but written, so the
            # next setting's SVD is computed afresh rather than taken from the shared copy
            lm = model.merge_and_unload()


if __name__ == "__main__":
    main()
