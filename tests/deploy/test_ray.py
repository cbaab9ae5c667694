"""`unilora serve --ray`: the server as a Ray Serve application on a local Ray cluster that the
test starts (127.0.0.1, 2 replicas of a tiny model) and ends. Requests for one adapter stick to
one replica (the `x-unilora-replica` header names it), answers equal isolated generation, errors
keep their shape, killing a replica's process mid-load loses no request silently, and SIGTERM
shuts the cluster down."""

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import httpx
import pytest
from serving import ServerProcess, isolated_greedy, tokenizer, write_adapter, write_tiny_llama  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
KEY = "ray-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ray")
    model_dir = write_tiny_llama(root / "llama", tokenizer)
    store = root / "store"
    for i, method in enumerate(["lora", "unilora", "vblora", "vera"]):
        write_adapter(model_dir, store / f"a{i}", method, seed=i)
    process = ServerProcess(root / "server.log", "--model", str(model_dir), "--adapters", str(store), "--ray",
                            "--replicas", "2", "--api-key", KEY)
    try:
        process.wait_ready(timeout=240)
        process.model_dir, process.store = model_dir, store
        yield process
    finally:
        process.stop()
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)  # nothing left behind


def complete(server, name, prompt="Hello there", max_tokens=6, timeout=60):
    return httpx.post(server.url + "/v1/completions", headers=HEADERS, timeout=timeout,
                      json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_requests_for_one_adapter_stick_to_one_replica_and_answer_exactly(cluster, tokenizer):
    seen = {}
    for round_ in range(3):
        for i in range(4):
            response = complete(cluster, f"a{i}")
            assert response.status_code == 200, response.text
            seen.setdefault(f"a{i}", set()).add(response.headers["x-unilora-replica"])
            if round_ == 0:
                ids = tokenizer("Hello there")["input_ids"]
                expected = tokenizer.decode(isolated_greedy(cluster.model_dir, cluster.store / f"a{i}", ids, 6),
                                            skip_special_tokens=True)
                assert response.json()["choices"][0]["text"] == expected
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def test_errors_and_streaming_pass_through_the_router(cluster, tokenizer):
    missing = complete(cluster, "nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.post(cluster.url + "/v1/completions", json={"model": "a0", "prompt": "x"}).status_code == 401
    wrong_method = httpx.delete(cluster.url + "/v1/completions", headers=HEADERS, timeout=60)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    body = {"model": "a1", "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    streamed = "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1])
    ids = tokenizer("Hello there")["input_ids"]
    expected = tokenizer.decode(isolated_greedy(cluster.model_dir, cluster.store / "a1", ids, 6), skip_special_tokens=True)
    assert streamed == expected


def test_killing_a_replica_mid_load_loses_no_request_silently(cluster, tokenizer):
    expected = {}
    for i in range(4):
        ids = tokenizer("Hello there")["input_ids"]
        expected[f"a{i}"] = tokenizer.decode(isolated_greedy(cluster.model_dir, cluster.store / f"a{i}", ids, 6),
                                             skip_special_tokens=True)
    replica_of = {f"a{i}": complete(cluster, f"a{i}").headers["x-unilora-replica"] for i in range(4)}
    victim_replica = replica_of["a0"]
    victim = int(victim_replica.rsplit("/", 1)[1])

    def ask(n):
        try:
            return n, complete(cluster, f"a{n % 4}", timeout=120)
        except httpx.HTTPError as err:  # a dropped connection is a failure the client sees
            return n, err

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, n) for n in range(40)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=180) for f in futures]  # every request ends: none hangs
    for n, result in results:
        name = f"a{n % 4}"
        if isinstance(result, httpx.Response) and result.status_code == 200:
            assert result.json()["choices"][0]["text"] == expected[name]
        else:  # only the killed replica's requests may fail, and visibly: an error answer or a dropped connection
            assert replica_of[name] == victim_replica, (name, result)
            assert not isinstance(result, httpx.Response) or (result.status_code >= 500 and "error" in result.json())
    deadline = time.monotonic() + 120  # Ray restarts the replica
    while time.monotonic() < deadline:
        if complete(cluster, "a0").status_code == 200 and complete(cluster, "a2").status_code == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the cluster did not recover after a replica was killed")


def listening_addresses(root_pid: int) -> dict[str, set[str]]:
    """{process name: the addresses its TCP sockets listen on} for `root_pid` and every process under it
    (read from /proc: each process's socket inodes, matched with /proc/net/tcp and tcp6)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    family, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in family]
        family.update(children)
        frontier += children
    listening = {}  # inode -> address
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    address, port = fields[1].split(":")
                    listening[fields[9]] = f"{address}:{int(port, 16)}"
    found = {}
    for pid in family:
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.setdefault(name, set()).add(listening[target[8:-1]])
        except OSError:
            continue
    return found


LOOPBACK = ("0100007F:", "00000000000000000000000001000000:")  # 127.0.0.1 and ::1 as /proc/net writes them


def test_the_http_port_listens_where_host_says(cluster):
    """--host 127.0.0.1 (the default): the port that answers requests listens on the loopback only.
    (Ray 2.60's own GCS, raylet and worker gRPC servers listen on every interface whatever the node
    address; docs/scaling.md says so and what to do about it.)"""
    found = listening_addresses(cluster.process.pid)
    on_port = {address for addresses in found.values() for address in addresses
               if address.endswith(f":{cluster.port}")}
    assert on_port and all(address.startswith(LOOPBACK) for address in on_port), found


def test_a_job_trained_through_the_router_is_served_by_every_replica(cluster, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "yes"}]}
            for i in range(12)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    upload = httpx.post(cluster.url + "/v1/files", headers=HEADERS, timeout=60, data={"purpose": "fine-tune"},
                        files={"file": ("train.jsonl", body)})
    assert upload.status_code == 200, upload.text
    created = httpx.post(cluster.url + "/v1/fine_tuning/jobs", headers=HEADERS, timeout=60, json={
        "model": str(cluster.model_dir), "training_file": upload.json()["id"], "seed": 0,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "adapter": {"theta_dim": 300}})
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 180
    while (job := httpx.get(f"{cluster.url}/v1/fine_tuning/jobs/{job_id}", headers=HEADERS,
                            timeout=30).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job["status"]
        time.sleep(0.5)
    assert job["status"] == "succeeded", job["error"]
    ids = tokenizer("Hello there")["input_ids"]
    expected = tokenizer.decode(isolated_greedy(cluster.model_dir, cluster.store / job_id, ids, 6),
                                skip_special_tokens=True)
    for _ in range(4):  # whichever serving replica answers, it reads the job store for the ft: name
        response = complete(cluster, job["fine_tuned_model"])
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
    assert complete(cluster, job_id).status_code == 404  # the store folder's own name is not a model


def test_sigterm_shuts_the_cluster_down(cluster):
    assert cluster.signal(signal.SIGTERM) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(cluster.url + "/health", timeout=5)
