"""Quantized bases on SmolLM2-135M-Instruct (CPU, fp32 compute), side by side in one run:

(a) base memory: bytes of the weights as saved (`torch.save` of the state dict) and the RSS of a
    process that loaded and quantized the model, for fp32, bf16, int8, int4 and nf4;
(b) serving: `unilora serve --quantize KIND`, N streaming clients on N Uni-LoRA adapters for a fixed
    window: decode tokens/s and p95 inter-token latency, per base;
(c) a training step (batch 4 x 128 tokens, forward and backward, Uni-LoRA on all linear layers, and
    PEFT's LoRA r=4 on the same torchao base): median step time and the process's peak RSS;
(d) merging on a quantized base: a Uni-LoRA adapter trained on it as `unilora finetune --quantize`
    trains (BBC headlines, 96 rows, one epoch), merged with its layers quantized again, measured by
    merge(check=...) on 8 test prompts: the largest change of an adapted layer's output (absolute and
    relative to that layer's largest output) and of the logits; then the same merged in fp32;
(e) eager against `torch.compile` (dynamic=False) on fp32 and int8: one forward of 16 rows x 8 tokens
    (no cache), the four taking turns in a seeded order, ratios to fp32 eager per round.

Each figure comes from its own process (memory is per process), one after the other.

    python benchmarks/quantized.py                       # about 10 minutes on 2 cores
    python benchmarks/quantized.py --clients 4 --seconds 10 --kinds fp32,int8
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from coserve import stream_load  # noqa: E402  (the benchmarks' streaming clients)
from serve import Process, write_adapters  # noqa: E402

import torch  # noqa: E402

from unilora.models.backbones import load_causal_lm  # noqa: E402
from unilora.models.embedded_llm import EMBEDDED_LLM  # noqa: E402
from unilora.models.quantization import quantize_model  # noqa: E402
from unilora.serve.allocator import return_freed_memory  # noqa: E402


def loaded(kind: str):
    tokenizer, model = load_causal_lm(EMBEDDED_LLM)
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    elif kind != "fp32":
        quantize_model(model, kind)
    return tokenizer, model.eval()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return round(int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024, 1)


def live_tensor_mb() -> float:
    """The bytes of every tensor storage alive in the process (a quantized tensor's inner data included)."""
    storages = {}
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            # a torchao tensor's inner tensors are counted themselves; bitsandbytes' Params4bit holds its data
            if isinstance(obj, torch.Tensor) and not type(obj).__module__.startswith("torchao"):
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return round(sum(storages.values()) / 2**20, 1)


def memory(kind: str) -> dict:
    """In this (child) process: the weights' bytes, the tensors alive, and the RSS after loading (and after
    glibc's malloc_trim, which hands freed memory back to the system)."""
    _, model = loaded(kind)
    gc.collect()
    found = {"live_tensors_mb": live_tensor_mb(), "rss_mb": rss_mb()}
    return_freed_memory()
    found["rss_after_malloc_trim_mb"] = rss_mb()
    buffer = io.BytesIO()  # measured last: the saved bytes themselves take memory
    torch.save(model.state_dict(), buffer)
    return {"weights_mb": round(buffer.tell() / 2**20, 1), **found}


def train_step(kind: str, library: str, steps: int = 6) -> dict:
    """In this (child) process: median step time and peak RSS, batch 4 x 128 tokens."""
    import unilora

    _, model = loaded(kind)
    if library == "ours":
        model = unilora.get_model(model, unilora.AdapterConfig(method="unilora", target_modules="all-linear", rank=4))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    model.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading and quantizing's high-water mark
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49000, (4, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": round(statistics.median(times[1:]), 3), "peak_rss_mb": round(peak, 1),
            "peak_rss_before_training_mb": round(before, 1)}


def merge_error(kind: str) -> dict:
    """In this (child) process: train on a `kind` base, then what merging (quantized again, or in fp32) changes."""
    from unilora.data.sources import DataSpec
    from unilora.store.io import read_adapter
    from unilora.data.lm_tokens import prompt_ids
    from unilora.engine.generation import left_padded
    from unilora.training.causal_lm import load_lm_adapter
    from unilora.training.runs import run_finetune

    out = Path(tempfile.mkdtemp(prefix=f"merge-{kind}-")) / "run"
    run = run_finetune(DataSpec("bbc_headlines", train_limit=96, test_limit=8), model=EMBEDDED_LLM, method="unilora",
                       out=out, epochs=1, batch_size=8, quantize=kind, progress=False)
    adapter = read_adapter(out / "adapter")
    found = {"eval_loss": round(run.metrics["history"][-1]["eval_loss"], 4)}
    for to in (None, "float32"):
        tokenizer, model = load_lm_adapter(adapter, None, kind)
        prompts = [prompt_ids(tokenizer, row["messages"][:-1], True) for row in run.dataset.test[:8]]
        report = model.eval().merge(to=to, check=left_padded(prompts, tokenizer.pad_token_id))
        found["requantized" if to is None else "fp32"] = {
            "layer_max_abs": report.layer_max_abs, "layer_relative": report.layer_relative,
            "worst_layer": report.worst_layer, "logits_max_abs": report.output_max_abs}
    return found


def compiled_forward(rounds: str = "8") -> dict:
    """In this (child) process: fp32 and int8, eager and compiled, a 16 x 8-token forward each turn."""
    ids = torch.randint(0, 49000, (16, 8), generator=torch.Generator().manual_seed(0))
    cases, found = {}, {}
    for kind in ("fp32", "int8"):
        _, model = loaded(kind)
        cases[f"{kind} eager"] = model
        cases[f"{kind} compiled"] = torch.compile(model, dynamic=False)
    times = {name: [] for name in cases}
    with torch.no_grad():
        for name, model in cases.items():
            started = time.perf_counter()
            model(input_ids=ids), model(input_ids=ids)
            found[f"{name}: first two calls s"] = round(time.perf_counter() - started, 1)
        order = random.Random(0)
        for _ in range(int(rounds)):
            for name in order.sample(list(cases), len(cases)):
                started = time.perf_counter()
                cases[name](input_ids=ids)
                times[name].append(time.perf_counter() - started)
    for name, taken in times.items():
        found[f"{name}: ms"] = round(statistics.median(taken) * 1000, 1)
        found[f"{name}: fp32 eager / this"] = round(statistics.median(
            [b / t for b, t in zip(times["fp32 eager"], taken)]), 3)
    return found


def child(what: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="fp32,bf16,int8,int4,nf4")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rows", default="a,b,c,d,e")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks-quantized.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        run = {"memory": memory, "train": train_step, "merge": merge_error, "compile": compiled_forward}[what]
        print(json.dumps(run(*rest)))
        return
    kinds = args.kinds.split(",")
    record = {"clients": args.clients, "window_s": args.seconds, "max_tokens": args.max_tokens, "torch": torch.__version__}
    if "a" in args.rows:
        record["a_memory"] = {kind: child("memory", kind) for kind in kinds}
        print(json.dumps(record["a_memory"]), flush=True)
    if "b" in args.rows:
        work = Path(tempfile.mkdtemp(prefix="quantized-"))
        store = work / "store"
        store.mkdir()
        names = [p.name for p in write_adapters(store, args.clients, 23040)]
        record["b_serving"] = {}
        for i, kind in enumerate(k for k in kinds if k != "bf16"):
            port = 8330 + i
            command = [sys.executable, "-m", "unilora", "serve", "--adapters", str(store), "--port", str(port)]
            if kind != "fp32":
                command += ["--quantize", kind]
            server = Process(command, f"http://127.0.0.1:{port}", work / f"{kind}.log").wait()
            try:
                asyncio.run(stream_load(server.url, names, 5, 4))  # attach every adapter first
                record["b_serving"][kind] = asyncio.run(stream_load(server.url, names, args.seconds, args.max_tokens))
            finally:
                server.stop()
            print(kind, json.dumps(record["b_serving"][kind]), flush=True)
    if "c" in args.rows:
        record["c_train_step"] = {f"{library}:{kind}": child("train", kind, library)
                                  for kind in ("fp32", "int8") for library in ("ours", "peft")}
        print(json.dumps(record["c_train_step"]), flush=True)
    if "d" in args.rows:
        record["d_merge"] = {kind: child("merge", kind) for kind in kinds if kind not in ("fp32", "bf16")}
        print(json.dumps(record["d_merge"]), flush=True)
    if "e" in args.rows:
        record["e_compile"] = child("compile")
        print(json.dumps(record["e_compile"]), flush=True)
    if args.out.exists() and args.rows != "a,b,c,d,e":  # a partial run updates the rows it ran
        record = {**json.loads(args.out.read_text()), **record}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
