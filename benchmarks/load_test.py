"""A bounded load test of a running `unilora serve`: N requests from C concurrent clients over A
adapters of its store, greedy, each answer checked.

Reports status counts, p50/p99 latency, and whether every sampled answer equals the one the same
request gave alone (sent again, one at a time, after the load: the server's isolated answer).
It stops by itself after `--requests`.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 2000 --clients 64 \\
        --adapters 200 --check 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


async def run_load(url: str, names: list[str], requests: int, clients: int, max_tokens: int, seed: int = 0,
                   api_key: str | None = None, check: int = 20) -> dict:
    rng = random.Random(seed)
    jobs = [(rng.choice(names), f"Request {i}: tell me about {rng.choice(['rain', 'tea', 'maps', 'owls'])}")
            for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in enumerate(jobs):
        queue.put_nowait(job)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    answers: dict[int, str] = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(client: httpx.AsyncClient, name: str, prompt: str) -> tuple[int, str | None]:
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = await client.post(url + "/v1/completions", json=body, headers=headers)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
        return response.status_code, text

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            try:
                index, (name, prompt) = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            status, text = await one(client, name, prompt)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if text is not None:
                answers[index] = text

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        sample = rng.sample(sorted(answers), min(check, len(answers)))
        wrong = 0
        for index in sample:  # the same request alone: nothing else in the batch
            status, text = await one(client, *jobs[index])
            wrong += status != 200 or text != answers[index]
    latencies.sort()
    return {"requests": requests, "clients": clients, "adapters": len(names), "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if s >= 500), "checked": len(sample), "wrong": wrong,
            "p50_s": statistics.median(latencies), "p99_s": latencies[int(0.99 * (len(latencies) - 1))],
            "seconds": elapsed, "requests_per_s": requests / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=200, help="how many of the store's adapters to address")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--check", type=int, default=50, help="answers checked against the same request alone")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    listed = httpx.get(args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key
                       else {}, timeout=60).json()["data"]
    names = [m["id"] for m in listed if m["parent"]][: args.adapters]
    print(json.dumps(asyncio.run(run_load(args.url, names, args.requests, args.clients, args.max_tokens,
                                          api_key=args.api_key, check=args.check)), indent=1))


if __name__ == "__main__":
    main()
