"""`unilora serve` on SmolLM2-135M, side by side in one run (CPU, 2 cores), same prompts and lengths:

(a) 32 concurrent clients each on its own adapter vs 32 on one adapter (tokens/s);
(b) vs the server a user would write today: FastAPI + PeftModel LoRA, `set_adapter` per request
    (benchmarks/peft_set_adapter_server.py), 32 clients each on its own adapter;
(c) ours on the base model alone vs `transformers serve --continuous-batching` on the base model;
(d) time to first token of a cold adapter (never used) vs a resident one, on an idle server;
(e) a store of 10,000 adapters with 1,000 made resident: bytes the server holds for adapters
    (its `unilora_resident_adapter_bytes`) vs the bytes those adapters store, and the process RSS;
(f) head of line: the latency of 2-token requests sent every 0.5 s on an idle server, and while one
    request with 4 prompts of about 1,200 tokens runs, with --max-iteration-tokens 128 (the default) and
    256, and with a budget no prompt reaches (one-shot prefill, as before chunking); and that long
    request's time alone under each.

Adapters: Uni-LoRA on q_proj, v_proj (rank 4, d = 23,040, one seed, random θ); the store's 10,000
folders are copies of 32 of them under their own names (each is attached separately).
Each server runs in its own process, one after the other; throughput is completion tokens
(`usage`) over wall time. Writes a JSON record with every figure; docs/benchmarks.md quotes it.

    python benchmarks/serve.py                        # about 10 minutes on 2 cores
    python benchmarks/serve.py --requests-per-client 1 --max-tokens 16    # a quick look
    python benchmarks/serve.py --rows f --iteration-tokens 128,256,512   # row (f) alone, several budgets
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import unilora
from unilora.models.backbones import load_causal_lm
from unilora.models.embedded_llm import EMBEDDED_LLM, embedded_llm_folder

HERE = Path(__file__).resolve().parent
TOPICS = ["rain", "tea", "maps", "owls", "trains", "bread", "salt", "moss"]


def write_adapters(folder: Path, count: int, theta_dim: int) -> list[Path]:
    _, base = load_causal_lm(EMBEDDED_LLM)
    config = unilora.AdapterConfig(method="unilora", target_modules=["q_proj", "v_proj"], rank=4,
                                   theta_dim=theta_dim, seed=0)
    model = unilora.get_model(base, config, adapter_name="a0")
    paths = []
    for i in range(count):
        name = f"a{i}"
        if i:
            model.add_adapter(name, config)
        generator = torch.Generator().manual_seed(i)
        for param in model.projections[name].parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        paths.append(folder / name)
        model.save_pretrained(paths[-1], adapter_name=name)
    return paths


class Process:
    def __init__(self, command: list[str], url: str, log: Path):
        self.url = url
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(self, timeout: float = 600) -> "Process":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args[:4]} exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        raise TimeoutError(f"{self.process.args[:4]} did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def load(url: str, models: list[str], requests_per_client: int, max_tokens: int) -> dict:
    """Client i sends `requests_per_client` completions for models[i], one after the other."""
    latencies, tokens = [], 0

    async def client(i: int, session: httpx.AsyncClient) -> None:
        nonlocal tokens
        for j in range(requests_per_client):
            prompt = f"Write a short note about {TOPICS[(i + j) % len(TOPICS)]} for reader {i}."
            started = time.perf_counter()
            response = await session.post(url + "/v1/completions", json={
                "model": models[i], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(models))) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(len(models))))
        elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 2),
            "p50_s": round(statistics.median(latencies), 3)}


def first_token_s(url: str, model: str) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "Say one word.", "max_tokens": 2, "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - started
    raise RuntimeError("no token came back")


async def warm(url: str, names: list[str], concurrency: int) -> None:
    queue = list(names)

    async def worker(session):
        while queue:
            name = queue.pop()
            (await session.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1,
                                                               "temperature": 0})).raise_for_status()

    async with httpx.AsyncClient(timeout=600) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


LONG_PROMPT = " ".join(f"Item {i}: the committee noted the weather, the harvest and the roads." for i in range(70))


async def head_of_line(url: str, gap: float = 0.5, idle_samples: int = 10) -> dict:
    """Row (f) on one server: 2-token requests alone, one every `gap` seconds; one request with 4 long
    prompts alone; then the same long request with 2-token requests sent every `gap` seconds meanwhile."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=200)) as session:
        async def short() -> float:
            started = time.perf_counter()
            response = await session.post(url + "/v1/completions", json={
                "model": EMBEDDED_LLM, "prompt": "Say one word.", "max_tokens": 2, "temperature": 0})
            response.raise_for_status()
            return time.perf_counter() - started

        async def long() -> tuple[float, int]:
            started = time.perf_counter()
            response = await session.post(url + "/v1/completions", json={
                "model": EMBEDDED_LLM, "prompt": [LONG_PROMPT] * 4, "max_tokens": 8, "temperature": 0})
            response.raise_for_status()
            return time.perf_counter() - started, response.json()["usage"]["prompt_tokens"]

        idle = []
        for _ in range(idle_samples):
            idle.append(await short())
            await asyncio.sleep(gap)
        long_alone, prompt_tokens = await long()
        running = asyncio.create_task(long())
        shorts = []
        while not running.done():
            shorts.append(asyncio.create_task(short()))
            await asyncio.sleep(gap)
        long_busy, _ = await running
        busy = list(await asyncio.gather(*shorts))

    def quantile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"idle_p50_s": quantile(idle, 0.5), "idle_p99_s": quantile(idle, 0.99),
            "beside_long_p50_s": quantile(busy, 0.5), "beside_long_p99_s": quantile(busy, 0.99),
            "short_requests_beside_long": len(busy), "long_prompt_tokens": prompt_tokens,
            "long_alone_s": round(long_alone, 2), "long_with_shorts_s": round(long_busy, 2)}


def metric(url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)", httpx.get(url + "/metrics").text, re.M).group(1))


def rows_a_to_e(args, work: Path, record: dict) -> None:
    """Rows (a) to (e): throughput, PEFT, transformers serve, the first token of a cold adapter, memory."""
    store = work / "store"
    store.mkdir()
    originals = write_adapters(work / "originals", args.clients, args.theta_dim)
    # rows (d) and (e) need the large store; (a) and (c) only the clients' own adapters
    names = [f"u{i:05d}" for i in range(args.store_size if set(args.rows) & set("de") else args.clients)]
    for i, name in enumerate(names):
        shutil.copytree(originals[i % len(originals)], store / name)
    own = names[: args.clients]
    port = 8310
    ours = Process([sys.executable, "-m", "unilora", "serve", "--adapters", str(store), "--port", str(port),
                    "--max-resident", str(args.resident + 64), "--max-batch", str(args.clients),
                    "--device", args.device, "--dtype", args.dtype, "--log-level", "warning"], f"http://127.0.0.1:{port}", work / "ours.log").wait()
    try:
        asyncio.run(load(ours.url, own, 1, 4))  # warm-up: every own adapter resident
        loads = {"a_own_adapters": own, "a_one_adapter": [own[0]] * args.clients,
                 "c_ours_base": [EMBEDDED_LLM] * args.clients}
        runs = {key: [] for key in loads}
        order = random.Random(0)
        for _ in range(args.repeats):  # the three loads take turns, so that the machine's drift reaches each alike
            for key in order.sample(list(loads), len(loads)):  # in a fresh order each round
                models = loads[key]
                runs[key].append(asyncio.run(load(ours.url, models, args.requests_per_client, args.max_tokens)))
        for key, measured in runs.items():  # the run with the median throughput, and every throughput
            ordered = sorted(measured, key=lambda r: r["tokens_per_s"])
            record[key] = {**ordered[len(ordered) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in measured]}
        if set(args.rows) & set("de"):
            cold, warm_ = [], []
            for j in range(args.cold_samples):  # an idle server: one request at a time
                name = names[args.clients + j]
                cold.append(first_token_s(ours.url, name))
                warm_.append(first_token_s(ours.url, name))
            record["d_first_token_s"] = {"cold_median": round(statistics.median(cold), 4),
                                         "resident_median": round(statistics.median(warm_), 4),
                                         "extra_ms_median": round(1000 * statistics.median(
                                             c - w for c, w in zip(cold, warm_)), 1)}
            rss_before = ours.rss_mb()
            resident_names = names[: args.resident]
            asyncio.run(warm(ours.url, resident_names, 32))
            stored = sum((store / n / "adapter_model.safetensors").stat().st_size for n in resident_names)
            held = metric(ours.url, "unilora_resident_adapter_bytes")
            count = metric(ours.url, "unilora_resident_adapters")
            record["e_memory"] = {"resident_adapters": int(count), "held_bytes": int(held),
                                  "stored_bytes_of_those_files": stored,
                                  "held_over_stored": round(held * args.resident / (count * stored), 4),
                                  "factor_cache_bound_bytes": 256 << 20,
                                  "rss_mb_before_after": [round(rss_before), round(ours.rss_mb())]}
    finally:
        ours.stop()
    if "b" in args.rows:
        peft_port = 8311
        peft = Process([sys.executable, str(HERE / "peft_set_adapter_server.py"), "--adapters", str(args.clients),
                        "--port", str(peft_port), "--device", args.device, "--dtype", args.dtype], f"http://127.0.0.1:{peft_port}", work / "peft.log").wait()
        try:
            record["b_peft_set_adapter"] = asyncio.run(load(peft.url, [f"a{i}" for i in range(args.clients)],
                                                            args.requests_per_client, args.max_tokens))
        finally:
            peft.stop()
    if "c" in args.rows:
        hf_port = 8312
        model_dir = str(embedded_llm_folder())
        hf = Process(["transformers", "serve", model_dir, "--host", "127.0.0.1", "--port", str(hf_port), "--device",
                      args.device, "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                      "--continuous-batching"], f"http://127.0.0.1:{hf_port}", work / "hf.log").wait()
        try:
            asyncio.run(load(hf.url, [model_dir] * 4, 1, 4))  # warm-up
            record["c_transformers_serve_base"] = asyncio.run(load(hf.url, [model_dir] * args.clients,
                                                                   args.requests_per_client, args.max_tokens))
        finally:
            hf.stop()
    ratios = {"a_own_over_one": ("a_own_adapters", "a_one_adapter"), "a_own_over_base": ("a_own_adapters", "c_ours_base"),
              "a_one_over_base": ("a_one_adapter", "c_ours_base"),
              "b_ours_over_peft_set_adapter": ("a_own_adapters", "b_peft_set_adapter"),
              "c_ours_base_over_transformers_serve": ("c_ours_base", "c_transformers_serve_base")}
    record["ratios"] = {name: round(record[a]["tokens_per_s"] / record[b]["tokens_per_s"], 3)
                        for name, (a, b) in ratios.items() if a in record and b in record}
    # the loads of one round ran a minute apart at most: their ratio is steadier than the ratio of
    # medians over rounds when the machine drifts between rounds
    record["ratios_per_round"] = {}
    for name, (a, b) in ratios.items():
        runs_a, runs_b = record.get(a, {}).get("tokens_per_s_runs"), record.get(b, {}).get("tokens_per_s_runs")
        if runs_a and runs_b:
            per_round = [x / y for x, y in zip(runs_a, runs_b)]
            record["ratios_per_round"][name] = {"median": round(statistics.median(per_round), 3),
                                                "rounds": [round(r, 3) for r in per_round]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--store-size", type=int, default=10_000)
    parser.add_argument("--resident", type=int, default=1000)
    parser.add_argument("--cold-samples", type=int, default=15)
    parser.add_argument("--theta-dim", type=int, default=23_040)
    parser.add_argument("--out", help="the JSON record (default: docs/benchmarks-serve.json, or "
                        "docs/benchmarks-serve-head-of-line.json for --rows f alone)")
    parser.add_argument("--device", default="cpu", help="where every server runs its model (cuda on a GPU)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rows", default="abcdef", help="which rows to run (letters)")
    parser.add_argument("--repeats", type=int, default=3, help="rows (a) and (c): rounds of the three loads")
    parser.add_argument("--iteration-tokens", default="128,256",
                        help="row (f): the --max-iteration-tokens budgets to compare with one-shot prefill")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                         + (f", {gpu}, {args.dtype}" if gpu else ""),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    try:
        if "f" in args.rows:
            record["f_head_of_line"] = {}
            for budget in [*map(int, args.iteration_tokens.split(",")), 1_000_000]:
                port = 8313
                server = Process([sys.executable, "-m", "unilora", "serve", "--adapters", str(work), "--port", str(port),
                                  "--max-iteration-tokens", str(budget), "--device", args.device, "--dtype", args.dtype,
                                  "--log-level", "warning"], f"http://127.0.0.1:{port}", work / f"f{budget}.log").wait()
                try:
                    asyncio.run(load(server.url, [EMBEDDED_LLM] * 2, 1, 2))  # warm-up
                    label = "one_shot_prefill" if budget == 1_000_000 else f"iteration_tokens_{budget}"
                    record["f_head_of_line"][label] = asyncio.run(head_of_line(server.url))
                finally:
                    server.stop()
            one_shot = record["f_head_of_line"]["one_shot_prefill"]
            for label, row in record["f_head_of_line"].items():
                row["beside_long_p50_over_idle_p50"] = round(row["beside_long_p50_s"] / row["idle_p50_s"], 2)
                row["long_alone_over_one_shot"] = round(row["long_alone_s"] / one_shot["long_alone_s"], 3)
        if set(args.rows) & set("abcde"):
            rows_a_to_e(args, work, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out or HERE.parent / "docs" / ("benchmarks-serve-head-of-line.json" if args.rows == "f"
                                                 else "benchmarks-serve.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
