"""Step time, peak memory, adapter bytes and merged-inference time: unilora vs plain LoRA vs PEFT.

Every variant (our method, PEFT's same method) trains in the same process, taking turns step
by step (A B A B ..., in a new seeded order every round), so machine noise hits all of them
alike. Ratios are taken per round (a variant's step over the reference's step of the same
round) and reported as their median with a 95% bootstrap interval: a target is shown to hold
only when the whole interval is below it. Peak memory is measured in one fresh process per
variant: the bytes torch holds (CUDA max allocated, or on CPU the tensors alive before a step
plus the highest running total of the step's allocations, from the profiler's memory events).
Needs `pip install peft==0.21.2`.

    python benchmarks/train_step.py                       # CPU, fp32, writes docs/benchmarks.md
    python benchmarks/train_step.py --device cuda --dtype bf16 --out docs/benchmarks-gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (builder, batch, seq_len, target modules)
    "roberta-base": ("roberta", 8, 128, ["query", "value"]),
    "llama-small": ("llama", 4, 256, ["q_proj", "v_proj"]),
    # real weights: the embedded SmolLM2-135M-Instruct (30 x 576, FFN 1536, k/v 192 wide)
    "smollm2-qv": ("smollm2", 4, 256, ["q_proj", "v_proj"]),
    "smollm2-all": ("smollm2", 4, 256, "all-linear"),
}
METHODS = ("lora", "vera", "vblora", "unilora")
SETTINGS = {  # the papers' settings on RoBERTa (seed 003 Table 1, Uni-LoRA), same for both libraries
    "lora": dict(rank=8),
    "vera": dict(rank=256),
    "vblora": dict(rank=4, num_vectors=90, vector_length=256, topk=2),
    "unilora": dict(rank=4, theta_dim=23040),
    "tinylora": dict(rank=2, u=64, weight_tying=0.0),  # PEFT's defaults
    "lora_xs": dict(rank=8),  # no PEFT peer: compared with our LoRA only
}
PEFT_PEERS = ("lora", "vera", "vblora", "unilora", "tinylora")


def build_base(shape: str, dtype: torch.dtype, device: str, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    kind = SHAPES[shape][0]
    if kind == "smollm2":
        from unilora.models.backbones import load_causal_lm

        return load_causal_lm("SmolLM2-135M-Instruct")[1].to(device=device, dtype=dtype)
    if kind == "roberta":
        size = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512) if quick else \
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                               num_labels=2, **size))
    else:
        size = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512) if quick else \
            dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, num_attention_heads=8, num_key_value_heads=8,
                                             max_position_embeddings=1024, **size))
    return model.to(device=device, dtype=dtype)


def make_batch(shape: str, device: str, quick: bool):
    _, batch, seq, _ = SHAPES[shape]
    seq = 32 if quick else seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (batch, seq), generator=g).to(device)
    if SHAPES[shape][0] == "roberta":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}
    return {"input_ids": ids, "labels": ids}


def adapt(library: str, method: str, base, shape: str, quick: bool):
    targets = SHAPES[shape][3]
    s = dict(SETTINGS[method])
    if SHAPES[shape][0] == "smollm2" and method == "vblora":
        s["vector_length"] = 192  # 256 divides neither 576 nor 192
    if quick and method == "unilora":
        s["theta_dim"] = 2048
    if library == "ours":
        import unilora

        return unilora.get_model(base, unilora.AdapterConfig(method=method, target_modules=targets, **s))
    import peft

    if method == "lora":
        config = peft.LoraConfig(r=s["rank"], lora_alpha=s["rank"], target_modules=targets)
    elif method == "vera":
        config = peft.VeraConfig(r=s["rank"], target_modules=targets)
    elif method == "tinylora":
        config = peft.TinyLoraConfig(r=s["rank"], u=s["u"], weight_tying=s["weight_tying"], target_modules=targets)
    elif method == "vblora":
        config = peft.VBLoRAConfig(r=s["rank"], num_vectors=s["num_vectors"], vector_length=s["vector_length"],
                                   topk=s["topk"], target_modules=targets)
    else:
        config = peft.UniLoraConfig(r=s["rank"], theta_d_length=s["theta_dim"], target_modules=targets)
    return peft.get_peft_model(base, config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One variant: a model, its optimizer, one timed training step at a time."""

    def __init__(self, library, method, shape, dtype, device, quick):
        self.name = f"{library}:{method}"
        self.model = adapt(library, method, build_base(shape, dtype, device, quick), shape, quick).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.batch = make_batch(shape, device, quick)
        self.device = device
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        sync(self.device)
        start = time.perf_counter()
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)


def adapter_bytes(runner: Runner, library: str) -> int:
    if library == "ours":
        return runner.model.stored_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        runner.model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


@torch.no_grad()
def merged_vs_base(shape, dtype, device, quick, steps) -> tuple[float, float]:
    """Median forward time of our merged-and-unloaded Uni-LoRA model and of the plain base model."""
    merged = adapt("ours", "unilora", build_base(shape, dtype, device, quick), shape, quick).merge_and_unload().eval()
    base = build_base(shape, dtype, device, quick).eval()
    batch = {k: v for k, v in make_batch(shape, device, quick).items() if k != "labels"}
    times = {"merged": [], "base": []}
    for i in range(steps + 2):
        for name, model in (("merged", merged), ("base", base)):
            sync(device)
            start = time.perf_counter()
            model(**batch)
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["merged"]), statistics.median(times["base"])


def peak_memory(variant: str, shape: str, args) -> float:
    """Peak memory (MiB) of a fresh process running 3 training steps of one variant."""
    cmd = [sys.executable, __file__, "--peak-of", variant, "--models", shape, "--device", args.device,
           "--dtype", args.dtype] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def alive_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind these tensors (tied weights counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cpu_step_peak_bytes(runner: Runner) -> int:
    """Tensors alive before a training step plus the highest running total of its allocations."""
    from torch.profiler import ProfilerActivity, profile

    state = [t for s in runner.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    before = alive_bytes(*runner.model.parameters(), *runner.model.buffers(), *state, *runner.batch.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(record=False)
    # kineto's "[memory]" events: +nbytes per allocation, -nbytes per free, in time order
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = highest = 0
    for event in events:
        running += event.nbytes()
        highest = max(highest, running)
    return before + highest


def measure_peak(variant: str, shape: str, args) -> None:
    library, method = variant.split(":")
    runner = Runner(library, method, shape, DTYPES[args.dtype], args.device, args.quick)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        runner.step(record=False)
    if args.device.startswith("cuda"):
        runner.step(record=False)
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = cpu_step_peak_bytes(runner)
    print(json.dumps({"peak_mib": peak / 2**20}))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def paired_ratio(times: list[float], reference: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median of per-round ratios and a 95% bootstrap interval for it."""
    ratios = [t / r for t, r in zip(times, reference)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), medians[49], medians[1949]


def bench_shape(shape: str, args) -> list[dict]:
    variants = [(lib, m) for m in args.methods for lib in ("ours", "peft") if lib == "ours" or m in PEFT_PEERS]
    runners = [Runner(lib, m, shape, DTYPES[args.dtype], args.device, args.quick) for lib, m in variants]
    for i in range(args.warmup + args.steps):
        # every variant once per round, in a fresh order so none always follows the same one
        for runner in random.Random(i).sample(runners, len(runners)):
            runner.step(record=i >= args.warmup)
    times = {r.name: r.times for r in runners}
    rows = []
    for (lib, m), runner in zip(variants, runners):
        rows.append({
            "model": shape, "variant": runner.name, "step_ms": 1000 * statistics.median(runner.times),
            "vs_our_lora": paired_ratio(runner.times, times["ours:lora"]),
            "vs_peft_same": paired_ratio(runner.times, times[f"peft:{m}"]) if m in PEFT_PEERS else None,
            "adapter_bytes": adapter_bytes(runner, lib),
        })
    del runners
    for row in rows:
        row["peak_mib"] = peak_memory(row["variant"], shape, args)
    merged, base = merged_vs_base(shape, DTYPES[args.dtype], args.device, args.quick, args.steps)
    for row in rows:
        row["merged_ms"], row["base_ms"] = 1000 * merged, 1000 * base
    return rows


def reconstruction_ms(shape: str, args, repeats: int = 30) -> list[dict]:
    """Our projection alone: rebuild what every layer reads (A, Bᵀ; for VeRA the vectors beside the
    frozen slices) and back-propagate into θ_d (median ms).

    This is all the work a method adds on top of the per-layer low-rank matmuls, so
    (step + this) / step bounds its slowdown far more tightly than noisy whole-step ratios.
    """
    rows = []
    for method in args.methods:
        base = build_base(shape, DTYPES[args.dtype], args.device, args.quick)
        projection = adapt("ours", method, base, shape, args.quick).projection
        times = []
        for i in range(repeats + 3):
            sync(args.device)
            start = time.perf_counter()
            sum(t.sum() for factors in projection.layer_factors() for t in factors).backward()
            sync(args.device)
            if i >= 3:
                times.append(time.perf_counter() - start)
        rows.append({"model": shape, "method": method, "reconstruction_ms": 1000 * statistics.median(times)})
    return rows


def profile_ours(shape: str, method: str, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    runner = Runner("ours", method, shape, DTYPES[args.dtype], args.device, args.quick)
    runner.step(record=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            runner.step(record=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    ours = [e for e in prof.key_averages() if e.key in ("aten::index_select", "aten::index_add_", "aten::topk", "aten::softmax")]
    lines = [f"{e.key}: {e.self_cpu_time_total / 1000:.2f} ms self CPU over 2 steps, {e.count} calls" for e in ours]
    return table + "\nreconstruction ops:\n" + "\n".join(lines)


def to_markdown(rows: list[dict], args, seconds: float) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [
        "# Benchmarks: training step, memory, adapter size, merged inference",
        "",
        f"Machine: {device}; torch {torch.__version__}; dtype {args.dtype}; {args.steps} timed rounds after "
        f"{args.warmup} warm-up, every variant one step per round in a seeded random order, one process. Step ms: "
        f"median. Ratios: median of the per-round ratios, 95% bootstrap interval in brackets. Peak memory: one "
        f"fresh process per variant, 3 steps, bytes held by torch ({'CUDA max allocated' if args.device.startswith('cuda') else 'tensors alive before the step + peak of its allocations'}; "
        f"model included). Run took {seconds / 60:.1f} min.",
        "",
        f"Command: `python benchmarks/train_step.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        "Shapes (random init from configs): roberta-base (12 x 768, batch 8 x 128, sequence classification), "
        "llama-small (8 x 512, FFN 1536, batch 4 x 256, causal LM); adapters on query/value (q_proj/v_proj). "
        "Real weights: smollm2-qv / smollm2-all (SmolLM2-135M-Instruct dequantized, 30 x 576, batch 4 x 256, "
        "causal LM with the full-vocabulary loss; q_proj/v_proj, or all linear layers). "
        "Settings: LoRA r=8; VeRA r=256; VB-LoRA h=90, b=256 (192 on SmolLM2), r=4, k=2; Uni-LoRA d=23,040, r=4; "
        "TinyLoRA r=2, u=64, weight_tying 0; LoRA-XS r=8 (no PEFT peer).",
        "",
        "| model | variant | step ms | / our LoRA | / PEFT same | peak MiB | adapter bytes | merged fwd ms | base fwd ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def ratio(value) -> str:
        if value is None:
            return "-"
        median, low, high = value
        return f"{median:.3f} [{low:.3f}, {high:.3f}]"

    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | {ratio(r['vs_our_lora'])} | {ratio(r['vs_peft_same'])} | "
                     f"{r['peak_mib']:.1f} | {r['adapter_bytes']:,} | {r['merged_ms']:.1f} | {r['base_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def reconstruction_markdown(rows: list[dict]) -> str:
    lines = ["Reconstruction alone (our projection: all layers' A, Bᵀ forward + backward into θ_d, median of 30):", "",
             "| model | method | reconstruction ms |", "| --- | --- | ---: |"]
    lines += [f"| {r['model']} | {r['method']} | {r['reconstruction_ms']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="roberta-base,llama-small")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script itself")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--profile", metavar="MODEL:METHOD", help="print a torch.profiler table of our step and exit")
    parser.add_argument("--reuse-timings", metavar="JSON", help="take step/merged times from an earlier --json; re-measure peaks only")
    parser.add_argument("--reconstruction-only", action="store_true", help="print only the reconstruction table")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    models = args.models.split(",")
    if args.peak_of:
        return measure_peak(args.peak_of, models[0], args)
    if args.profile:
        shape, method = args.profile.split(":")
        return print(profile_ours(shape, method, args))
    def reconstruction_table() -> str:
        return reconstruction_markdown([r for shape in models for r in reconstruction_ms(shape, args)])

    if args.reconstruction_only:
        return print(reconstruction_table())
    started = time.time()
    if args.reuse_timings:
        rows = json.loads(Path(args.reuse_timings).read_text())
        for row in rows:
            row["peak_mib"] = peak_memory(row["variant"], row["model"], args)
    else:
        rows = [row for shape in models for row in bench_shape(shape, args)]
    text = to_markdown(rows, args, time.time() - started)
    text += "\n" + reconstruction_table()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
