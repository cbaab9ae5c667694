"""The fine-tuning API of `unilora serve`: files and jobs as OpenAI's, jobs trained inside the server
between decoding turns, equal to `unilora finetune`, persistent across SIGTERM and kill -9, per
tenant. The tiny random Llama keeps every job a few seconds long."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from starlette.testclient import TestClient
from transformers import AutoTokenizer, LlamaForCausalLM

import unilora

from serving import ServerProcess, isolated_greedy, model_dir, tokenizer, write_adapter  # noqa: F401  (fixtures)
from unilora.data.lm_tokens import encode_examples
from unilora.data.sources import DataSpec
from unilora.serve import cotraining
from unilora.serve.app import create_app
from unilora.serve.settings import ServeSettings
from unilora.serve.slices import PieceAborted
from unilora.serve.training_job import JobRun
from unilora.training.loop import TrainingRun
from unilora.training.runs import run_finetune

ADAPTER = {"theta_dim": 300}  # the tiny Llama's LoRA space is 4,096 numbers: below the recipe's d
HYPER = {"n_epochs": 2, "batch_size": 4}


def sums(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        answer = f"{a + b}" + " is the answer" * rng.randint(0, 3)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", sums(13, 0)), write_jsonl(folder / "valid.jsonl", sums(5, 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, data):
    """What `unilora finetune` makes of the same files, base, method, seed and hyperparameters."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    run_finetune(DataSpec(data=str(data[0]), test_data=str(data[1])), task="causal-lm", model=str(model_dir),
                 epochs=HYPER["n_epochs"], batch_size=HYPER["batch_size"], seed=0, out=out, adapter=ADAPTER,
                 progress=False)
    return out / "adapter"


def theta_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert set(x) == set(y)
    return max((x[k] - y[k]).abs().max().item() for k in x)


def token_accuracy(model_dir: Path, adapter_dir: Path, path: Path) -> float:
    """The share of a file's target tokens that are the adapted model's most likely next token."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir).eval(), adapter_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    hits = targets = 0
    with torch.no_grad():
        for example in encode_examples(tokenizer, "chat", rows, 256, True):
            labels = torch.tensor(example.labels[1:])
            predicted = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].argmax(-1)
            scored = labels != -100
            hits += int((predicted[scored] == labels[scored]).sum())
            targets += int(scored.sum())
    return hits / targets


def serve_in_process(store: Path, model_dir: Path, **settings) -> TestClient:
    app = create_app(ServeSettings(adapters=str(store), model=str(model_dir), **settings))
    return TestClient(app)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)


def upload(client: TestClient, path: Path, headers=None) -> dict:
    response = client.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"},
                           headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(client: TestClient, job_id: str, headers=None, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.05)


def visible(store: Path) -> list[str]:
    """The store's adapter folders (the server keeps its job state in a hidden folder there)."""
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("."))


def create(client: TestClient, training: str, validation: str | None = None, headers=None, **body) -> dict:
    body = {"model": body.pop("model", None), "training_file": training, "validation_file": validation, "seed": 0,
            "hyperparameters": HYPER, "adapter": ADAPTER, **body}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


# --- in one process: the API's answers ------------------------------------------------------------------
def test_job_in_process_equals_finetune_with_checkpoints_and_events(tmp_path, model_dir, data, reference,
                                                                   monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    # a small budget, and the server never counted idle: every optimizer step is taken in parts of a
    # row or two, whose gradients add up, and each part in slices of a turn's credit
    monkeypatch.setattr(cotraining, "QUIET_SECONDS", float("inf"))
    monkeypatch.setattr(cotraining, "ALONE_FACTOR", 1)
    pieces, stops = [], []
    run_piece, between = JobRun.run_piece, cotraining.CoTrainer._between_slices
    monkeypatch.setattr(JobRun, "run_piece", lambda job, *args: (pieces.append(args), run_piece(job, *args))[1])
    monkeypatch.setattr(cotraining.CoTrainer, "_between_slices", lambda trainer: (stops.append(1), between(trainer))[1])
    with serve_in_process(store, model_dir, max_iteration_tokens=16) as client:
        wait_ready(client)
        train, valid = upload(client, data[0]), upload(client, data[1])
        response = create(client, train["id"], valid["id"], model=str(model_dir), suffix="sums")
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "validating_files" and job["fine_tuned_model"] is None
        done = wait_for(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["fine_tuned_model"] == f"ft:{model_dir.name}:sums:{job['id']}"
        assert done["trained_tokens"] > 0
        assert theta_difference(reference, store / job["id"]) < 1e-5
        assert len(stops) > 2 * len(pieces) > 2 * 26  # 13 rows, 2 epochs, one row per piece at most

        events = [e["message"] for e in reversed(client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100")
                                                 .json()["data"])]
        assert events[0].startswith("Validating training file") and events[-1] == "The job has successfully completed"
        assert sum(m.startswith("Step ") for m in events) == 8  # 13 rows at batch 4: 4 steps, 2 epochs
        reference_losses = json.loads((reference.parent / "metrics.json").read_text())["history"]
        epochs = [m for m in events if m.startswith("Epoch ")]
        assert [f"{h['eval_loss']:.4f}" in m for h, m in zip(reference_losses, epochs)] == [True, True]

        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert [c["step_number"] for c in checkpoints] == [8, 4]
        # the whole validation file's mean token accuracy, as the result scores it through full logits
        final = checkpoints[0]["metrics"]
        assert final["valid_mean_token_accuracy"] == final["full_valid_mean_token_accuracy"]
        assert abs(final["valid_mean_token_accuracy"] - token_accuracy(model_dir, store / job["id"], data[1])) < 1e-9
        assert f"validation token accuracy={final['valid_mean_token_accuracy']:.4f}" in epochs[-1]
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert done["fine_tuned_model"] in names and not any(n.startswith("ftjob-") for n in names)

        # the result and a checkpoint are served by name at once; the store folder's own name is not a model
        for model in (done["fine_tuned_model"], checkpoints[1]["fine_tuned_model_checkpoint"]):
            answer = client.post("/v1/completions", json={"model": model, "prompt": "What is", "max_tokens": 4,
                                                          "temperature": 0})
            assert answer.status_code == 200, answer.text
        assert client.post("/v1/completions", json={"model": job["id"], "prompt": "x"}).status_code == 404
        ids = client.post("/v1/completions", json={"model": done["fine_tuned_model"], "prompt": "What is 3 plus",
                                                   "max_tokens": 6, "temperature": 0, "logprobs": 0}).json()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = tokenizer("What is 3 plus")["input_ids"]
        expected = tokenizer.decode(isolated_greedy(model_dir, reference, prompt, 6))
        assert ids["choices"][0]["text"] == expected


def test_an_idle_server_trains_whole_steps_and_hands_their_memory_back(tmp_path, model_dir, data, reference,
                                                                      monkeypatch):
    monkeypatch.setattr(cotraining, "QUIET_SECONDS", 0.0)  # idle from the start
    parts, handed_back = [], []
    accumulate = TrainingRun.accumulate
    monkeypatch.setattr(TrainingRun, "accumulate",
                        lambda run, indices, share=1.0: (parts.append(len(indices)), accumulate(run, indices, share))[1])
    monkeypatch.setattr(cotraining, "return_freed_memory", lambda: handed_back.append(True) or True)
    store = tmp_path / "store"
    store.mkdir()
    with serve_in_process(store, model_dir, max_iteration_tokens=64) as client:
        wait_ready(client)
        train, valid = upload(client, data[0]), upload(client, data[1])
        done = wait_for(client, create(client, train["id"], valid["id"], model=str(model_dir)).json()["id"])
        assert done["status"] == "succeeded", done["error"]
        assert parts == [4, 4, 4, 1] * 2  # 13 rows at batch 4, each step whole, as finetune takes them
        assert theta_difference(reference, store / done["id"]) < 1e-5
        deadline = time.monotonic() + 10
        while not handed_back:  # the last job gone: its steps' memory goes back to the system
            assert time.monotonic() < deadline, "the steps' memory was not handed back"
            time.sleep(0.05)


def test_a_fitted_rate_is_said_with_the_apis_way_to_change_it(tmp_path, model_dir, data):
    store = tmp_path / "store"
    store.mkdir()
    with serve_in_process(store, model_dir) as client:
        wait_ready(client)
        # d = 16 shares each θ entry among 256 LoRA weights: the recipe's θ rate is scaled up, and said so
        job = create(client, upload(client, data[0])["id"], model=str(model_dir), adapter={"theta_dim": 16},
                     hyperparameters={"n_epochs": 1, "batch_size": 4}).json()
        assert wait_for(client, job["id"])["status"] == "succeeded"
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]]
    notes = [m for m in events if m.startswith("θ learning rate")]
    assert len(notes) == 1 and "D/d = 256.0 LoRA weights here" in notes[0]
    assert notes[0].endswith("(hyperparameters.learning_rate_multiplier scales it)")  # not the CLI's --group-lr


def test_bad_files_and_jobs_are_refused_in_one_line(tmp_path, model_dir, data):
    store = tmp_path / "store"
    store.mkdir()
    with serve_in_process(store, model_dir, max_file_mb=1) as client:
        wait_ready(client)
        bad = tmp_path / "mine.jsonl"
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                       '{"messages": [{"role": "user", "content": "no answer"}]}\n')
        response = client.post("/v1/files", files={"file": ("mine.jsonl", bad.read_bytes())}, data={"purpose": "fine-tune"})
        error = response.json()["error"]
        assert response.status_code == 400 and error["message"].startswith("mine.jsonl:2: ")
        assert str(store) not in error["message"]
        assert client.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "batch"}).status_code == 400
        assert client.post("/v1/files", files={"file": ("a.exe", b"x")}, data={"purpose": "fine-tune"}).status_code == 400
        assert client.post("/v1/files", json={"purpose": "fine-tune"}).status_code == 400
        big = client.post("/v1/files", files={"file": ("big.jsonl", b"x" * (1 << 20 + 1) * 2)}, data={"purpose": "fine-tune"})
        assert big.status_code == 413
        assert client.get("/v1/files").json()["data"] == []  # nothing refused was kept

        train = upload(client, data[0])
        assert client.get(f"/v1/files/{train['id']}/content").content == data[0].read_bytes()
        cases = [({"training_file": "file-nothere"}, 404), ({"model": "other-model"}, 400),
                 ({"adapter": {"method": "nope"}}, 400), ({"adapter": {"rank": -1}}, 400),
                 ({"hyperparameters": {"n_epochs": 0}}, 400), ({"hyperparameters": {"n_epochs": 1, "lr": 2}}, 400),
                 ({"method": {"type": "dpo"}}, 400), ({"suffix": "a/b"}, 400)]
        for change, status in cases:
            body = {"model": str(model_dir), "training_file": train["id"], "adapter": ADAPTER, **change}
            response = client.post("/v1/fine_tuning/jobs", json=body)
            assert response.status_code == status, (change, response.text)
            assert "\n" not in response.json()["error"]["message"]
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert client.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 404


def test_cancel_leaves_nothing_and_full_disk_fails_the_job_alone(tmp_path, model_dir, data, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(model_dir, store / "kept", "lora", seed=1)
    before = visible(store)
    with serve_in_process(store, model_dir, max_iteration_tokens=4) as client:
        wait_ready(client)
        train = upload(client, data[0])
        many = {"n_epochs": 50, "batch_size": 1}
        job = create(client, train["id"], model=str(model_dir), hyperparameters=many).json()
        deadline = time.monotonic() + 60
        while not any(e["message"].startswith("Checkpoint") for e in
                      client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 400
        deadline = time.monotonic() + 30
        while visible(store) != before:  # the worker takes its checkpoints away
            assert time.monotonic() < deadline, visible(store)
            time.sleep(0.05)
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []

        def full_disk(self, directory):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(JobRun, "save_adapter", full_disk)
        failed = wait_for(client, create(client, train["id"], model=str(model_dir)).json()["id"])
        assert failed["status"] == "failed" and "No space left" in failed["error"]["message"]
        assert visible(store) == before
        # serving goes on
        answer = client.post("/v1/completions", json={"model": "kept", "prompt": "hello", "max_tokens": 2})
        assert answer.status_code == 200


def test_a_job_cancelled_in_the_middle_of_a_piece_leaves_the_next_job_exact(tmp_path, model_dir, data, reference,
                                                                           monkeypatch):
    """The cancel reaches the job while a piece is part-way (stopped between two blocks): the piece
    is unwound, nothing of the job stays, and the next job still equals `unilora finetune`."""
    monkeypatch.setattr(cotraining, "QUIET_SECONDS", float("inf"))
    monkeypatch.setattr(cotraining, "ALONE_FACTOR", 1)
    aborted = []
    run_piece, between = JobRun.run_piece, cotraining.CoTrainer._between_slices

    def recording_aborts(job, *args):
        try:
            return run_piece(job, *args)
        except PieceAborted:
            aborted.append(job.request.id)
            raise

    def cancel_when_part_way(trainer):
        job = trainer.current
        if job.run.steps_done >= 2 and not aborted:
            trainer.cancel(job.request.id)  # seen at this very stop, the piece part-way
        return between(trainer)

    monkeypatch.setattr(JobRun, "run_piece", recording_aborts)
    monkeypatch.setattr(cotraining.CoTrainer, "_between_slices", cancel_when_part_way)
    store = tmp_path / "store"
    store.mkdir()
    with serve_in_process(store, model_dir, max_iteration_tokens=8) as client:
        wait_ready(client)
        train, valid = upload(client, data[0]), upload(client, data[1])
        first = wait_for(client, create(client, train["id"], model=str(model_dir)).json()["id"])
        assert first["status"] == "cancelled"
        deadline = time.monotonic() + 30
        while not aborted:
            assert time.monotonic() < deadline, "the piece was not unwound"
            time.sleep(0.05)
        assert aborted == [first["id"]]
        monkeypatch.setattr(cotraining.CoTrainer, "_between_slices", between)
        second = wait_for(client, create(client, train["id"], valid["id"], model=str(model_dir)).json()["id"])
        assert second["status"] == "succeeded", second["error"]
        assert theta_difference(reference, store / second["id"]) < 1e-5
        assert visible(store) == [second["id"]] + [f"{second['id']}.step-{s}" for s in (4, 8)]


def test_tenants_see_only_their_own(tmp_path, model_dir, data):
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(model_dir, store / "shared", "lora", seed=2)
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenant key\nalice alice-key-123\nbob sha256:" + hashlib.sha256(b"bob-key-456").hexdigest() + "\n")
    alice, bob = {"Authorization": "Bearer alice-key-123"}, {"Authorization": "Bearer bob-key-456"}
    with serve_in_process(store, model_dir, api_keys=str(keys), tenant_max_jobs=1) as client:
        wait_ready(client)
        assert client.get("/v1/files", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        train = upload(client, data[0], alice)
        assert client.get(f"/v1/files/{train['id']}", headers=bob).status_code == 404
        assert client.get("/v1/files", headers=bob).json()["data"] == []
        job = create(client, train["id"], headers=alice, model=str(model_dir)).json()
        # bob cannot use alice's file, see her job, or cancel it; alice's second job waits for her limit
        assert create(client, train["id"], headers=bob, model=str(model_dir)).status_code == 404
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bob).status_code == 404
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=bob).status_code == 404
        assert create(client, train["id"], headers=alice, model=str(model_dir)).status_code == 429
        done = wait_for(client, job["id"], alice)
        assert done["status"] == "succeeded", done["error"]
        tuned = done["fine_tuned_model"]
        bob_models = [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]]
        alice_models = [m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]]
        assert "shared" in bob_models and tuned not in bob_models and tuned in alice_models
        body = {"model": tuned, "prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body, headers=bob).status_code == 404
        assert client.post("/v1/completions", json=body, headers=alice).status_code == 200
        assert client.get(f"/v1/models/{tuned}", headers=bob).status_code == 404


# --- real processes: the openai client, co-serving, SIGTERM and kill -9 -------------------------------------
@pytest.mark.slow
def test_openai_client_job_while_serving_then_sigterm_and_kill_resume_exactly(tmp_path, model_dir, data, reference,
                                                                               tokenizer):
    openai = pytest.importorskip("openai")
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(model_dir, store / "other", "unilora", seed=3)
    args = ["--adapters", str(store), "--model", str(model_dir), "--max-iteration-tokens", "16"]
    prompts = [f"Tell me about {word}" for word in ("cats", "rivers", "stars", "bread")]
    expected = {p: tokenizer.decode(isolated_greedy(model_dir, store / "other", tokenizer(p)["input_ids"], 8),
                                    skip_special_tokens=True) for p in prompts}

    server = ServerProcess(tmp_path / "serve-1.log", *args).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        train = client.files.create(file=data[0].open("rb"), purpose="fine-tune")
        valid = client.files.create(file=(data[1].name, data[1].read_bytes()), purpose="fine-tune")
        assert [f.id for f in client.files.list().data] == [valid.id, train.id]
        job = client.fine_tuning.jobs.create(model=str(model_dir), training_file=train.id, validation_file=valid.id,
                                             seed=0, suffix="sums", hyperparameters=HYPER,
                                             extra_body={"adapter": ADAPTER})
        # other clients are served while the job trains; their greedy answers are those of no job at all
        answers, errors, stop = [], [], threading.Event()

        def load():
            try:
                while not stop.is_set() and len(answers) < 200:
                    for prompt in prompts:
                        out = client.completions.create(model="other", prompt=prompt, max_tokens=8, temperature=0)
                        answers.append((prompt, out.choices[0].text, client.fine_tuning.jobs.retrieve(job.id).status))
            except Exception as err:  # the test fails on it below
                errors.append(err)

        clients = [threading.Thread(target=load) for _ in range(2)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 120
        while client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stop.set()
        for thread in clients:
            thread.join(60)
        assert not errors, errors
        done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded", done.error
        assert theta_difference(reference, store / job.id) < 1e-5
        assert any(status == "running" for _, _, status in answers)  # some answers came while it trained
        for prompt, text, _ in answers:
            assert text == expected[prompt]
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert any(e.message.startswith("Step 8/8") for e in events)
        chat = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "What is 3 plus 4?"}])
        assert chat.choices[0].finish_reason in ("length", "stop")

        # a longer job, stopped by SIGTERM in its middle: it saves where it is and resumes after a restart
        long_hyper = {"n_epochs": 3, "batch_size": 2}
        second = client.fine_tuning.jobs.create(model=str(model_dir), training_file=train.id, seed=0,
                                                hyperparameters=long_hyper, extra_body={"adapter": ADAPTER})
        deadline = time.monotonic() + 60
        while not any(e.message.startswith("Step 3/") for e in client.fine_tuning.jobs.list_events(second.id).data):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert server.signal(signal.SIGTERM) == 0
    finally:
        server.stop()

    server = ServerProcess(tmp_path / "serve-2.log", *args).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        stopped = [e.message for e in client.fine_tuning.jobs.list_events(second.id, limit=100).data]
        assert any(m.startswith("The server stopped; the job resumes from step") for m in stopped), stopped
        deadline = time.monotonic() + 60
        while not any(e.message.startswith("Checkpoint") for e in client.fine_tuning.jobs.list_events(second.id).data):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.signal(signal.SIGKILL)  # no chance to save: it resumes from its last epoch's checkpoint
    finally:
        server.stop()

    server = ServerProcess(tmp_path / "serve-3.log", *args).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while (status := client.fine_tuning.jobs.retrieve(second.id).status) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert status == "succeeded", client.fine_tuning.jobs.retrieve(second.id).error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(second.id, limit=100).data]
        assert any("resumes from its last checkpoint" in m for m in messages)
        assert any(m.startswith("Fine-tuning job started") and "resumed at step" in m for m in messages)
    finally:
        server.stop()
    uninterrupted = tmp_path / "uninterrupted"
    run_finetune(DataSpec(data=str(data[0]), test_data=str(data[0])), task="causal-lm", model=str(model_dir),
                 epochs=long_hyper["n_epochs"], batch_size=long_hyper["batch_size"], seed=0, out=uninterrupted,
                 adapter=ADAPTER, progress=False)
    assert theta_difference(uninterrupted / "adapter", store / second.id) < 1e-5


def test_a_job_folder_that_cannot_be_written_leaves_serving_on(tmp_path, model_dir):
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(model_dir, store / "kept", "lora", seed=1)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # no folder can be made under it, whoever runs the test
    with serve_in_process(store, model_dir, jobs_dir=str(blocked / "jobs")) as client:
        wait_ready(client)
        refused = client.get("/v1/files")
        message = refused.json()["error"]["message"]
        assert refused.status_code == 404 and message.startswith("fine-tuning keeps its files and jobs in ")
        assert message.endswith("; start the server with --jobs-dir DIR")
        answer = client.post("/v1/completions", json={"model": "kept", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200
    assert sorted(p.name for p in store.iterdir()) == ["kept"]  # nothing written into the store
