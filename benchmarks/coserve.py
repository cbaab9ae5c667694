"""Training while serving, side by side in one run (SmolLM2-135M, CPU): streaming clients each on its
own adapter, with and without fine-tuning jobs trained inside the server.

(a) serving alone: N streaming clients on N adapters for a fixed window: decode tokens/s, p50 and
    p95 inter-token latency (ITL), the server's peak RSS during the window (and since its start);
    run before (b) and again after (d) on a new server, (b)'s ratios taken to the two windows' mean;
(b) the same load while 2 jobs train in the server: the same figures, and the jobs' training
    tokens/s (the rows' tokens, padding not counted: the server's `unilora_training_tokens`);
(c) what a user builds today: the same load on a server while 2 `unilora finetune` processes (one
    epoch each) train beside it, until both end: the streams' figures and the two runs' tokens/s;
(d) the same 2 jobs on the idle server (the load ended): training tokens/s; and `unilora finetune`
    alone on the same file (one epoch): its tokens/s (the file's tokens over its train_seconds);
(f) on an idle server: a 16-row job created to succeeded, then the first streamed token of the new
    model (the time after the job succeeded).

Each server runs in its own process, one after the other; (b) and (d) share a server. Writes a JSON
record with every figure; docs/benchmarks.md quotes it.

    python benchmarks/coserve.py                                # about 8 minutes on 2 cores
    python benchmarks/coserve.py --clients 4 --seconds 20       # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve import TOPICS, Process, metric, write_adapters  # noqa: E402  (the serving benchmark's helpers)

from unilora.data.lm_tokens import encode_examples  # noqa: E402
from unilora.models.backbones import load_causal_lm  # noqa: E402
from unilora.models.embedded_llm import EMBEDDED_LLM  # noqa: E402


def training_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"messages": [{"role": "user", "content": f"Write one sentence about {topic}."},
                                  {"role": "assistant", "content": f"Here is a sentence about {topic}: "
                                   + " ".join(rng.choice(TOPICS) for _ in range(rng.randint(8, 30))) + "."}]})
    return rows


async def stream_load(url: str, models: list[str], seconds: float, max_tokens: int, until=None) -> dict:
    """Client i streams completions for models[i], one after another, until the window ends (or,
    with `until`, until it returns True, at most `seconds`)."""
    gaps, tokens = [], 0
    deadline = time.perf_counter() + seconds

    async def client(i: int, session: httpx.AsyncClient) -> None:
        nonlocal tokens
        j = 0
        while time.perf_counter() < deadline and not (until is not None and until()):
            prompt = f"Write a short note about {TOPICS[(i + j) % len(TOPICS)]} for reader {i}."
            j += 1
            last = None
            async with session.stream("POST", url + "/v1/completions", json={
                    "model": models[i], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        tokens += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(models))) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(len(models))))
        elapsed = time.perf_counter() - started
    gaps.sort()
    return {"tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 2),
            "itl_p50_s": round(statistics.median(gaps), 4), "itl_p95_s": round(gaps[int(0.95 * (len(gaps) - 1))], 4)}


def peak_rss_mb(process: Process) -> float:
    """The process's peak resident memory since it started, or since `reset_peak_rss`."""
    with open(f"/proc/{process.process.pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss(process: Process) -> float:
    """Start the peak over from the current resident memory (Linux: clear_refs 5); returns the peak
    since the start, so a row can quote both."""
    lifetime = peak_rss_mb(process)
    with open(f"/proc/{process.process.pid}/clear_refs", "w") as f:
        f.write("5")
    return lifetime


def start_jobs(url: str, train: Path, count: int, epochs: int) -> list[str]:
    with train.open("rb") as handle:
        file_id = httpx.post(url + "/v1/files", files={"file": (train.name, handle.read())},
                             data={"purpose": "fine-tune"}, timeout=60).json()["id"]
    jobs = []
    for i in range(count):
        response = httpx.post(url + "/v1/fine_tuning/jobs", timeout=60, json={
            "model": EMBEDDED_LLM, "training_file": file_id, "seed": i,
            "hyperparameters": {"n_epochs": epochs, "batch_size": 8}})
        response.raise_for_status()
        jobs.append(response.json()["id"])
    deadline = time.monotonic() + 300
    while any(httpx.get(f"{url}/v1/fine_tuning/jobs/{j}").json()["status"] != "running" for j in jobs):
        if time.monotonic() > deadline:
            raise TimeoutError("the jobs did not start")
        time.sleep(0.5)
    return jobs


def next_count(url: str) -> tuple[float, float]:
    """(the moment the server's trained-token counter next moves, its new value). The counter moves
    once per piece (on an idle server a whole step, hundreds of tokens), so a rate timed between such
    moments counts whole pieces, not a window's share of them (about 9 % granularity in 30 s)."""
    start = metric(url, "unilora_training_tokens_total")
    while (count := metric(url, "unilora_training_tokens_total")) == start:
        time.sleep(0.05)
    return time.perf_counter(), count


def trained_per_s(url: str, window: float, during=None) -> tuple[float, object]:
    """Training tokens/s between two moves of the counter: over `window` on an idle server, or, while
    `during` (a load of `window` seconds) runs, over the middle of it (from 3 s in, for 60 % of the
    window), so that neither end falls while the server is quiet and takes whole steps."""
    if during is None:
        started, before = next_count(url)
        time.sleep(window)
        ended, after = next_count(url)
        return (after - before) / (ended - started), None
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = pool.submit(during)
        time.sleep(3)
        started, before = next_count(url)
        time.sleep(0.6 * window)
        ended, after = next_count(url)
        return (after - before) / (ended - started), load.result()


def file_tokens(train: Path) -> int:
    """The training tokens of one epoch over the file, as finetune encodes it."""
    tokenizer, _ = load_causal_lm(EMBEDDED_LLM)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    return sum(len(e.input_ids) for e in encode_examples(tokenizer, "chat", rows, 256, True))


def finetune_alone(work: Path, train: Path) -> float:
    """`unilora finetune` on the file, one epoch: the file's training tokens over its train_seconds."""
    out = work / "finetune"
    subprocess.run([sys.executable, "-m", "unilora", "finetune", "--task", "causal-lm", "--data", str(train),
                    "--test-data", str(train), "--epochs", "1", "--batch-size", "8", "--out", str(out)],
                   check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return file_tokens(train) / metrics["history"][-1]["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="each load window")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64, help="training rows of each job")
    parser.add_argument("--training-share", default="0.1", help="the server's --training-share")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks-coserve.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coserve-"))
    store = work / "store"
    store.mkdir()
    names = [p.name for p in write_adapters(store, args.clients, 23040)]
    train = work / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in training_rows(args.rows)) + "\n")
    record = {"machine": platform.processor() or platform.machine(), "clients": args.clients,
              "training_share": float(args.training_share),
              "window_s": args.seconds, "max_tokens": args.max_tokens, "training_rows": args.rows}

    def server(tag: str, port: int) -> Process:
        return Process([sys.executable, "-m", "unilora", "serve", "--adapters", str(store), "--port", str(port),
                        "--training-share", args.training_share],
                       f"http://127.0.0.1:{port}", work / f"{tag}.log").wait()

    def serving_alone(key: str, port: int) -> None:
        alone = server(key, port)
        try:
            asyncio.run(stream_load(alone.url, names, 5, 4))  # attach every adapter first
            before = reset_peak_rss(alone)
            record[key] = {**asyncio.run(stream_load(alone.url, names, args.seconds, args.max_tokens)),
                           "peak_rss_mb": round(peak_rss_mb(alone), 1),
                           "peak_rss_mb_since_start": round(max(before, peak_rss_mb(alone)), 1)}
        finally:
            alone.stop()
        print(json.dumps(record[key]), flush=True)

    # (a) runs before and after (b): the machine's speed drifts by 10-20 % between windows a minute
    # apart, so (b) is compared with the mean of the two windows that bracket it
    serving_alone("a_serving_alone", 8320)

    busy = server("coserve", 8321)
    try:
        asyncio.run(stream_load(busy.url, names, 5, 4))
        jobs = start_jobs(busy.url, train, 2, epochs=50)
        before = reset_peak_rss(busy)
        rate, load = trained_per_s(busy.url, args.seconds,
                                   lambda: asyncio.run(stream_load(busy.url, names, args.seconds, args.max_tokens)))
        record["b_serving_with_2_jobs"] = {**load, "training_tokens_per_s": round(rate, 1),
                                           "peak_rss_mb": round(peak_rss_mb(busy), 1),
                                           "peak_rss_mb_since_start": round(max(before, peak_rss_mb(busy)), 1)}
        print(json.dumps(record["b_serving_with_2_jobs"]), flush=True)
        time.sleep(1)  # the server notices that nothing is served (QUIET_SECONDS)
        idle_rate, _ = trained_per_s(busy.url, min(args.seconds, 30))
        record["d_jobs_on_idle_server"] = {"training_tokens_per_s": round(idle_rate, 1),
                                           "peak_rss_mb_since_b_began": round(peak_rss_mb(busy), 1)}
        for job in jobs:
            httpx.post(f"{busy.url}/v1/fine_tuning/jobs/{job}/cancel", timeout=60)
    finally:
        busy.stop()
    serving_alone("a_serving_alone_after_b", 8324)
    record["d_finetune_alone"] = {"training_tokens_per_s": round(finetune_alone(work, train), 1)}

    beside = server("beside", 8322)
    try:
        asyncio.run(stream_load(beside.url, names, 5, 4))
        runs = [subprocess.Popen([sys.executable, "-m", "unilora", "finetune", "--task", "causal-lm", "--data", str(train),
                                  "--test-data", str(train), "--epochs", "1", "--batch-size", "8", "--seed", str(i),
                                  "--no-progress", "--out", str(work / f"beside-{i}")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        load = asyncio.run(stream_load(beside.url, names, 20 * args.seconds, args.max_tokens,
                                       until=lambda: all(r.poll() is not None for r in runs)))
        for run in runs:
            run.wait()
        tokens = file_tokens(train)
        rates = [tokens / json.loads((work / f"beside-{i}" / "metrics.json").read_text())["history"][-1]["train_seconds"]
                 for i in range(2)]
        record["c_serving_beside_2_finetunes"] = {**load, "training_tokens_per_s": round(sum(rates), 1),
                                                  "peak_rss_mb_server": round(peak_rss_mb(beside), 1)}
        print(json.dumps(record["c_serving_beside_2_finetunes"]), flush=True)
    finally:
        beside.stop()

    idle = server("first-token", 8323)
    try:
        small = work / "small.jsonl"
        small.write_text("\n".join(json.dumps(r) for r in training_rows(16)) + "\n")
        created = time.perf_counter()
        job = start_jobs(idle.url, small, 1, epochs=1)[0]
        while (status := httpx.get(f"{idle.url}/v1/fine_tuning/jobs/{job}").json())["status"] != "succeeded":
            if status["status"] in ("failed", "cancelled"):
                raise RuntimeError(status["error"])
            time.sleep(0.02)
        succeeded = time.perf_counter()
        with httpx.stream("POST", idle.url + "/v1/chat/completions", timeout=120, json={
                "model": status["fine_tuned_model"], "messages": [{"role": "user", "content": "Say one word."}],
                "max_tokens": 2, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    break
        first = time.perf_counter()
        record["f_upload_to_first_token"] = {"job_seconds": round(succeeded - created, 2),
                                             "succeeded_to_first_token_s": round(first - succeeded, 3)}
        print(json.dumps(record["f_upload_to_first_token"]), flush=True)
    finally:
        idle.stop()
    a, b = record["a_serving_alone"], record["b_serving_with_2_jobs"]
    a_mean = {k: (a[k] + record["a_serving_alone_after_b"][k]) / 2 for k in ("tokens_per_s", "itl_p95_s")}
    record["ratios"] = {"b_over_a_tokens_per_s": round(b["tokens_per_s"] / a_mean["tokens_per_s"], 3),
                        "b_over_a_itl_p95": round(b["itl_p95_s"] / a_mean["itl_p95_s"], 3),
                        "b_over_idle_training": round(b["training_tokens_per_s"]
                                                      / record["d_jobs_on_idle_server"]["training_tokens_per_s"], 3),
                        "idle_jobs_over_finetune": round(record["d_jobs_on_idle_server"]["training_tokens_per_s"]
                                                         / record["d_finetune_alone"]["training_tokens_per_s"], 3),
                        "b_over_a_peak_rss": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)}
    c = record["c_serving_beside_2_finetunes"]
    record["ratios"].update({"b_over_c_itl_p95": round(b["itl_p95_s"] / c["itl_p95_s"], 3),
                             "b_over_c_training": round(b["training_tokens_per_s"] / c["training_tokens_per_s"], 3)})
    print(json.dumps(record, indent=1))
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
