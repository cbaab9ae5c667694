"""`unilora serve` as a real process on 127.0.0.1, driven by the `openai` client and httpx: every
endpoint, streaming, exactness against isolated generation under a mixed batch, every error, hot
add and remove, the API key, a client that disconnects, SIGTERM, a bounded load test, and the
README's client snippet as written. Each test ends every process it started."""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from serving import METHODS, ServerProcess, isolated_greedy, model_dir, tokenizer, write_adapter, write_store, write_tiny_llama  # noqa: F401,E501 (fixtures)

import unilora
from unilora.models.backbones import load_causal_lm
from unilora.data.lm_tokens import prompt_ids
from unilora.serve.scheduler import eos_ids

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from load_test import run_load  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "test-key"


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir):
    """The eight adapters, and what a request cannot use: a damaged file, an adapter for a wider model,
    a folder holding a config and no weights, a symlink out of the store, a folder named like the base."""
    root = write_store(tmp_path_factory.mktemp("store"), model_dir)
    shutil.copytree(root / "user-1.v1", root / "damaged")
    weights = root / "damaged" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f")
    config = LlamaConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 48, 96
    wide = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(config).save_pretrained(wide)
    write_adapter(wide, root / "foreign", "lora", seed=1)
    (root / "halfway").mkdir()
    shutil.copy(root / "user-0.v1" / "adapter_config.json", root / "halfway")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "user-0.v1", outside / "elsewhere")
    os.symlink(outside / "elsewhere", root / "escape")
    shutil.copytree(root / "user-0.v1", root / "tiny")  # the served model name: a request for it gets the base
    return root


@pytest.fixture(scope="module")
def server(model_dir, store, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("runtime")
    process = ServerProcess(tmp_path_factory.mktemp("log") / "server.log", "--model", str(model_dir),
                            "--adapters", str(store), "--api-key", KEY, "--served-model-name", "tiny",
                            "--max-new-tokens-limit", "250", "--max-body-kb", "64",
                            "--allow-runtime-loading", str(runtime))
    try:
        process.wait_ready()
        process.runtime = runtime
        yield process
    finally:
        process.stop()


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_models_lists_the_base_and_every_adapter_a_request_could_use(server):
    listed = [m.id for m in client(server).models.list().data]
    assert sorted(listed) == sorted(["tiny", "damaged", "foreign", *(f"user-{i}.v1" for i in range(8))])
    card = client(server).models.retrieve("user-3.v1")
    assert (card.id, card.object, card.parent) == ("user-3.v1", "model", "tiny")
    assert client(server).models.retrieve("tiny").parent is None
    for missing in ("nobody", "halfway", "escape"):
        with pytest.raises(openai.NotFoundError) as err:
            client(server).models.retrieve(missing)
        assert err.value.body["code"] == "model_not_found"
    head = httpx.head(server.url + "/health", timeout=10)
    assert head.status_code == 200 and head.content == b""


def test_a_mixed_batch_of_eight_adapters_and_the_base_equals_isolated_generation(server, model_dir, store, tokenizer):
    names = [f"user-{i}.v1" for i in range(8)] + ["tiny"] * 2
    prompts = [f"Write about topic number {i}" + "!" * i for i in range(len(names))]
    api = client(server)

    def ask(name, prompt):
        return api.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(ask, names, prompts))
    for name, prompt, answer in zip(names, prompts, answers):
        ids = tokenizer(prompt)["input_ids"]
        expected = isolated_greedy(model_dir, None if name == "tiny" else store / name, ids, 10)
        assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), name
        assert answer.usage.prompt_tokens == len(ids) and answer.model == name
    assert len({a.choices[0].text for a in answers[:8]}) > 1


def test_chat_and_streaming_give_the_same_text(server, tokenizer, model_dir, store):
    api = client(server)
    messages = [{"role": "user", "content": "Say something short."}]
    whole = api.chat.completions.create(model="user-2.v1", messages=messages, max_tokens=12, temperature=0)
    chunks = list(api.chat.completions.create(model="user-2.v1", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = isolated_greedy(model_dir, store / "user-2.v1", tokenizer(ids, add_special_tokens=False)["input_ids"], 12)
    assert whole.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    text_stream = list(api.completions.create(model="user-3.v1", prompt="abc", max_tokens=6, temperature=0, stream=True))
    whole_text = api.completions.create(model="user-3.v1", prompt="abc", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in text_stream) == whole_text.choices[0].text


def test_errors_come_back_in_openais_shape_and_others_keep_serving(server, store, model_dir, tokenizer):
    api = client(server)
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        api.completions.create(model="damaged", prompt="x", max_tokens=2)
    assert "damaged" in err.value.body["message"] and str(store) not in err.value.body["message"]
    errors_before = metric(server, "unilora_adapter_errors_total")
    with pytest.raises(openai.UnprocessableEntityError) as err:  # a proper status, before the stream's first byte
        api.completions.create(model="foreign", prompt="x", max_tokens=2, stream=True)
    assert err.value.status_code == 422 and "another base model" in err.value.body["message"]
    assert metric(server, "unilora_adapter_errors_total") == errors_before + 1
    answer = api.completions.create(model="user-1.v1", prompt="x", max_tokens=4, temperature=0).choices[0].text
    assert answer == greedy_text(model_dir, store / "user-1.v1", tokenizer, "x", 4)
    cases = [
        (b"{broken", 400, "not valid JSON"),
        ({"model": "user-0.v1", "prompt": "x", "max_tokens": 251}, 400, "limit of 250"),
        ({"model": "user-0.v1", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "../../etc/passwd", "prompt": "x"}, 404, "not an adapter name"),
        ({"model": "user-0.v1", "prompt": "x" * 70_000}, 413, "larger than"),
    ]
    for body, status, fragment in cases:
        response = post(server, "/v1/completions", body)
        assert response.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], response.text)
        error = response.json()["error"]
        assert fragment in error["message"] and set(error) >= {"message", "type", "code"}
    nothing = post(server, "/v1/embeddings", {})
    assert nothing.status_code == 404 and nothing.json()["error"]["code"] is None
    assert "no endpoint /v1/embeddings" in nothing.json()["error"]["message"]
    wrong_method = httpx.delete(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    deep = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 1000 + b"]" * 1000
                + b"}")
    assert deep.status_code == 400 and "nests JSON deeper" in deep.json()["error"]["message"]


def test_the_api_key_is_required_on_v1_only(server):
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def greedy_text(model_dir, adapter_dir, tokenizer, prompt: str, max_tokens: int) -> str:
    """What the adapter alone answers (greedy), as the server's text."""
    return tokenizer.decode(isolated_greedy(model_dir, adapter_dir, tokenizer(prompt)["input_ids"], max_tokens),
                            skip_special_tokens=True)


def test_adapters_added_and_removed_while_serving(server, store, model_dir, tokenizer):
    api = client(server)
    new = store / "late-arrival"
    try:
        write_adapter(model_dir, new, "unilora", seed=42)
        answer = api.completions.create(model="late-arrival", prompt="x", max_tokens=4, temperature=0)
        assert answer.choices[0].text == greedy_text(model_dir, new, tokenizer, "x", 4)
        assert "late-arrival" in {m.id for m in api.models.list().data}
    finally:
        shutil.rmtree(new)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="late-arrival", prompt="x", max_tokens=2)


def test_runtime_loading_stays_under_its_root(server, store, model_dir, tokenizer):
    shutil.copytree(store / "user-5.v1", server.runtime / "five")
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "escape", "lora_path": str(store / "user-5.v1")}
                ).status_code == 403
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "five", "lora_path": "five"}).status_code == 200
    answer = client(server).completions.create(model="five", prompt="x", max_tokens=4, temperature=0)
    assert answer.choices[0].text == greedy_text(model_dir, store / "user-5.v1", tokenizer, "x", 4)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "five"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="five", prompt="x", max_tokens=2)


def never_ending(tokenizer, model) -> dict:
    """A logit_bias that bans every token that ends a generation (the server's own list, scheduler.eos_ids):
    a generation then runs to its max_tokens unless it is cancelled."""
    return {str(token): -100 for token in eos_ids(tokenizer, model)}


def test_a_client_that_disconnects_stops_its_generation(server, tokenizer, model_dir):
    def generated() -> float:
        return metric(server, "unilora_generated_tokens_total")

    before = generated()
    # no end-of-sequence token can end it: only cancelling keeps it under its 240 tokens
    body = {"model": "user-0.v1", "prompt": "go on", "max_tokens": 240, "temperature": 0.8, "stream": True,
            "logit_bias": never_ending(tokenizer, LlamaForCausalLM.from_pretrained(model_dir))}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the client goes away after its first chunk
    time.sleep(1.0)
    assert metric(server, "unilora_running_rows") == 0
    assert generated() - before < 240


def test_metrics_report_requests_tokens_and_residency(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("unilora_requests_total", "unilora_time_to_first_token_seconds_bucket", "unilora_queue_depth",
                 "unilora_resident_adapters", "unilora_adapter_loads_total", "unilora_adapter_load_seconds_bucket",
                 "unilora_request_seconds_bucket", "unilora_generated_tokens_total"):
        assert name in text, name
    assert float(re.search(r"^unilora_resident_adapters (\S+)", text, re.M).group(1)) >= 1


def test_a_bounded_load_has_no_server_error_and_no_wrong_answer(model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for i in range(4):
        write_adapter(model_dir, store / f"a{i}", ["lora", "unilora", "vblora", "vera"][i], seed=i)
    for i in range(4, 300):  # a large store: copies of the four under new names
        shutil.copytree(store / f"a{i % 4}", store / f"a{i}")
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store),
                            "--max-resident", "20")
    try:
        process.wait_ready()
        result = asyncio.run(run_load(process.url, [f"a{i}" for i in range(0, 300, 5)], requests=240, clients=32,
                                      max_tokens=6, check=20))
        assert result["server_errors"] == 0 and result["statuses"] == {200: 240}
        assert result["wrong"] == 0 and result["checked"] == 20
        metrics = httpx.get(process.url + "/metrics", timeout=10).text
        assert float(re.search(r"^unilora_resident_adapters (\S+)", metrics, re.M).group(1)) <= 20
    finally:
        process.stop()


def test_overload_is_503_with_retry_after_never_a_hang(model_dir, store, tmp_path):
    """One row decoding and one waiting is all this server holds: of six requests sent at once,
    the rest are refused at once with Retry-After, and the ones taken finish."""
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store),
                            "--max-batch", "1", "--max-queue", "1", "--max-new-tokens-limit", "200")
    long = {"model": "user-0.v1", "prompt": "x", "max_tokens": 200, "temperature": 0.9, "stop": ["\u0000"]}
    try:
        process.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            barrier = threading.Barrier(6)

            def send():
                barrier.wait()
                return httpx.post(process.url + "/v1/completions", json=long, timeout=60)

            answers = [f.result() for f in [pool.submit(send) for _ in range(6)]]
        refused = [a for a in answers if a.status_code == 503]
        assert refused and all(a.status_code in (200, 503) for a in answers), [a.status_code for a in answers]
        assert all(a.headers["retry-after"] == "1" and a.json()["error"]["code"] == "overloaded" for a in refused)
        assert any(a.status_code == 200 for a in answers)
    finally:
        process.stop()


def test_a_request_past_its_timeout_is_504_and_the_server_goes_on(model_dir, store, tmp_path):
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store),
                            "--request-timeout", "0.05", "--max-new-tokens-limit", "200")
    try:
        process.wait_ready()
        body = {"model": "user-0.v1", "prompt": "x", "max_tokens": 200, "temperature": 0.9, "stop": ["\u0000"]}
        answer = httpx.post(process.url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        assert httpx.get(process.url + "/health", timeout=10).status_code == 200
    finally:
        process.stop()


def test_sigterm_drains_requests_in_flight_and_exits_0(model_dir, store, tmp_path):
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store))
    try:
        process.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, process.url + "/v1/completions", timeout=60,
                                  json={"model": "user-0.v1", "prompt": "x", "max_tokens": 240, "temperature": 0.8,
                                        "stop": ["\u0000"]})
            time.sleep(0.3)
            assert process.signal(signal.SIGTERM) == 0
            response = pending.result()
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.stop()


def test_past_the_drain_timeout_every_request_gets_a_503_and_the_exit_is_0(tokenizer, tmp_path):
    """Eight requests whose 2,000-token prompts are read one token per step (4 while nothing else runs:
    thousands of steps in all, whatever the machine's speed), SIGTERM, a 1 s drain: the few that finish
    in time are whole answers; every other non-stream request gets a 503 in OpenAI's shape, every other
    stream an error event then [DONE]; the log holds no traceback, and the process exits 0."""
    model_dir = write_tiny_llama(tmp_path / "long-context", tokenizer, max_positions=4096)
    write_adapter(model_dir, tmp_path / "store" / "user-0.v1", "lora", seed=0)
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(tmp_path / "store"),
                            "--drain-timeout", "1", "--max-iteration-tokens", "1", "--max-body-kb", "64")
    body = {"model": "user-0.v1", "prompt": "x " * 2000, "max_tokens": 16, "temperature": 0}

    def plain():
        return httpx.post(process.url + "/v1/completions", json=body, timeout=60)

    def streamed():
        with httpx.stream("POST", process.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            return r.status_code, [line for line in r.iter_lines() if line]

    try:
        process.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(plain) for _ in range(4)] + [pool.submit(streamed) for _ in range(4)]
            time.sleep(0.5)
            started = time.monotonic()
            assert process.signal(signal.SIGTERM) == 0
            assert time.monotonic() - started < 15
            results = [a.result() for a in answers]
        refused = 0
        for response in results[:4]:
            if response.status_code == 200:
                assert response.json()["usage"]["completion_tokens"] == 16
                continue
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert "shut down" in error["message"] and error["type"] and error["code"], error
            refused += 1
        cut = 0
        for status, lines in results[4:]:
            assert status == 200 and lines[-1] == "data: [DONE]", lines
            last_event = json.loads(lines[-2].removeprefix("data: "))
            if "error" in last_event:
                assert "shut down" in last_event["error"]["message"], lines
                cut += 1
            else:
                assert last_event["choices"][0]["finish_reason"] == "length", lines
        assert refused >= 2 and cut >= 2, (refused, cut)  # most were still reading their prompts
        log = process.output()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    finally:
        process.stop()


def test_sigterm_while_python_loads_the_libraries_exits_0(model_dir, store, tmp_path):
    """Before any server code runs, torch, transformers and fastapi take seconds to import: a SIGTERM
    then has nothing to drain and ends the process with 0 (it was 143, Python's default)."""
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store))
    try:
        time.sleep(0.8)
        assert process.process.poll() is None and process.output() == ""  # still importing: nothing said yet
        assert process.signal(signal.SIGTERM) == 0
        assert process.output() == ""
    finally:
        process.stop()


def test_sigterm_while_the_model_loads_exits_0(model_dir, store, tmp_path):
    process = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--adapters", str(store))
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in process.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.signal(signal.SIGTERM) == 0
    finally:
        process.stop()


def test_a_model_that_cannot_load_ends_the_process_with_one_line(store, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    process = ServerProcess(tmp_path / "server.log", "--model", str(empty), "--adapters", str(store))
    try:
        assert process.process.wait(timeout=120) == 2
        errors = [line for line in process.output().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(empty) in errors[0]
    finally:
        process.stop()


def test_the_readme_client_snippet_runs_as_written(server, tmp_path, model_dir, store, tokenizer):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Serve many adapters"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(snippet.replace("http://127.0.0.1:8000", server.url).replace('api_key="KEY"', f'api_key="{KEY}"')
                 .replace('"user-1"', '"user-1.v1"'), "README.md", "exec"), namespace)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}], chat=True)
    expected = tokenizer.decode(isolated_greedy(model_dir, store / "user-1.v1", ids, 32), skip_special_tokens=True)
    assert expected and namespace["answer"].choices[0].message.content == expected


def test_embedded_smollm2_serves_eight_adapters_and_the_base_exactly(tmp_path):
    """The real 135M model: concurrent chat requests for 8 adapters and the base, each equal to its
    adapter's isolated greedy generation."""
    tokenizer, base = load_causal_lm("SmolLM2-135M-Instruct")
    store = tmp_path / "store"
    names = [f"s{i}" for i in range(8)]
    model = None
    for name, method in zip(names, METHODS):
        config = unilora.AdapterConfig(method=method, target_modules=["q_proj", "v_proj"], rank=4, theta_dim=2000,
                                       num_vectors=64, vector_length=64, topk=2, seed=len(name) + names.index(name))
        if model is None:
            model = unilora.get_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        generator = torch.Generator().manual_seed(names.index(name))
        for param in model.projections[name].parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(store / name, adapter_name=name)
    model.eval()
    process = ServerProcess(tmp_path / "server.log", "--adapters", str(store))
    try:
        process.wait_ready(timeout=300)
        api = openai.OpenAI(base_url=process.url + "/v1", api_key="none", max_retries=0, timeout=300)
        names = names + ["SmolLM2-135M-Instruct"]
        prompt = "Name a colour."

        def ask(name):
            return api.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(ask, names))
        ids = torch.tensor([prompt_ids(tokenizer, prompt, chat=True)])
        for name, answer in zip(names, answers):
            with torch.no_grad(), (model.disable_adapter() if name.startswith("SmolLM2") else contextlib.nullcontext()):
                if not name.startswith("SmolLM2"):
                    model.set_adapter(name)
                out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=tokenizer.pad_token_id)
            assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), name

        # a non-stream client that gives up: its row is cancelled too (the real model takes about 10 s
        # for these 200 tokens, and no end-of-sequence token can end them sooner)
        before = metric(process, "unilora_generated_tokens_total")
        body = {"model": "s1", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0.8,
                "logit_bias": never_ending(tokenizer, base)}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(process.url + "/v1/completions", json=body, timeout=1.0)
        time.sleep(1.5)
        assert metric(process, "unilora_running_rows") == 0
        assert metric(process, "unilora_generated_tokens_total") - before < 200
    finally:
        process.stop()
