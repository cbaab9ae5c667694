"""The server's parts in one process (the fast tier): the running batch gives each row what it
would give alone, whatever joins or leaves; the LRU keeps its bounds and notices a replaced or
removed folder; names never leave the store; requests are checked before any work."""

import json
import os
import threading
import time

import pytest
import torch
from serving import isolated_greedy, model_dir, tokenizer, write_adapter, write_store  # noqa: F401 (fixtures)
from transformers import LlamaForCausalLM

from unilora.serve.adapters import prepare_adapter
from unilora.serve.protocol import ChatRequest, CompletionRequest, RequestError, parse
from unilora.serve.residency import Residency
from unilora.serve.sampling import Sampling
from unilora.serve.scheduler import Overloaded, Scheduler
from unilora.serve.sequence import DoneEvent, ErrorEvent, Sequence, TextEvent
from unilora.serve.worker import Worker
from unilora.store.names import BadAdapter, UnknownAdapter, check_name
from unilora.store.source import AdapterStore


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir):
    root = write_store(tmp_path_factory.mktemp("store"), model_dir)
    return root


class Collector:
    """A sink that records a sequence's events and says when it is done."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (DoneEvent, ErrorEvent)):
            self.done.set()

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextEvent))


def start_worker(model_dir, store, tokenizer, max_resident=100, max_batch=32, max_queue=64):
    base = LlamaForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    residency = Residency(base, max_resident, 1 << 30, 1 << 26)
    worker = Worker(Scheduler(residency, tokenizer, max_batch=max_batch, max_queue=max_queue), max_queue=max_queue)
    worker.residency, worker.store, worker.eos_ids = residency, AdapterStore(store), worker.scheduler.eos_ids
    worker.start()
    return worker


def submit(worker, name, ids, max_tokens, **sampling):
    """As a request does: the adapter prepared (held if resident, else read and checked), then submitted."""
    sink = Collector()
    adapter = prepare_adapter(worker.store, worker.residency, name, 1, worker.residency.shape) if name else None
    seq = Sequence(adapter, ids, Sampling(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0), **sampling),
                   sink, time.monotonic() + 60)
    worker.submit([seq])
    return seq, sink


def test_rows_joining_mid_decode_give_what_each_adapter_gives_alone(model_dir, store, tokenizer):
    """8 adapters of eight methods and the base model, arriving while others decode, each greedy
    output equal to its adapter's model.generate run alone."""
    worker = start_worker(model_dir, store, tokenizer)
    try:
        generator = torch.Generator().manual_seed(0)
        names = [f"user-{i}.v1" for i in range(8)] + [None, "user-3.v1", None, "user-0.v1"]
        prompts = [torch.randint(10, 5000, (int(n),), generator=generator).tolist()
                   for n in torch.randint(2, 14, (len(names),), generator=generator)]
        submitted = []
        for i, (name, ids) in enumerate(zip(names, prompts)):
            submitted.append(submit(worker, name, ids, max_tokens=12 + i % 5))
            time.sleep(0.01 * (i % 3))  # some arrive together, some while others decode
        for seq, sink in submitted:
            assert sink.done.wait(60), "generation did not finish"
            assert isinstance(sink.events[-1], DoneEvent), sink.events[-1]
        for (seq, _), name, ids in zip(submitted, names, prompts):
            expected = isolated_greedy(model_dir, store / name if name else None, ids, seq.sampling.max_tokens)
            got = seq.generated
            # an end-of-sequence token ends both; the server stops there
            assert got == expected[: len(got)] and (len(got) == len(expected) or got[-1] in worker.eos_ids), name
        assert len({tuple(s.generated) for s, _ in submitted[:8]}) > 1, "adapters must change the output"
    finally:
        worker.stop(5)


def test_lru_keeps_its_bound_and_notices_replaced_and_removed_folders(model_dir, store, tmp_path, tokenizer):
    import shutil

    own = tmp_path / "store"
    shutil.copytree(store, own)
    worker = start_worker(model_dir, own, tokenizer, max_resident=2)
    try:
        for i in range(5):
            _, sink = submit(worker, f"user-{i}.v1", [11, 12, 13], max_tokens=2)
            assert sink.done.wait(30)
            assert len(worker.residency.entries) <= 2
            assert len(worker.residency.model.adapters) <= 2
        ids = [21, 22, 23, 24]
        before, sink = submit(worker, "user-4.v1", ids, max_tokens=6)
        assert sink.done.wait(30)
        # replace user-4 by another adapter's files: the next request must run the new one
        shutil.rmtree(own / "user-4.v1")
        write_adapter(model_dir, own / "user-4.v1", "lora", seed=77)
        after, sink = submit(worker, "user-4.v1", ids, max_tokens=6)
        assert sink.done.wait(30)
        assert after.generated == isolated_greedy(model_dir, own / "user-4.v1", ids, 6)[: len(after.generated)]
        assert after.generated != before.generated
        shutil.rmtree(own / "user-4.v1")
        with pytest.raises(UnknownAdapter):
            worker.store.signature("user-4.v1")
    finally:
        worker.stop(5)


def test_a_damaged_or_foreign_adapter_fails_alone(model_dir, store, tmp_path, tokenizer):
    import shutil

    own = tmp_path / "store"
    shutil.copytree(store, own)
    weights = own / "user-1.v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BadAdapter, match="user-1.v1"):
        AdapterStore(own).read("user-1.v1")
    # an adapter for a wider model: the layout does not fit this base
    from transformers import LlamaConfig

    wide = tmp_path / "wide"
    config = LlamaConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(wide)
    write_adapter(wide, own / "foreign", "lora", seed=1)
    worker = start_worker(model_dir, own, tokenizer)
    try:
        with pytest.raises(BadAdapter, match="another base model"):  # refused as it is prepared, before any work
            submit(worker, "foreign", [5, 6, 7], max_tokens=20)
        good, good_sink = submit(worker, "user-0.v1", [5, 6, 7], max_tokens=20)
        assert good_sink.done.wait(30)
        assert isinstance(good_sink.events[-1], DoneEvent) and len(good.generated) > 0
    finally:
        worker.stop(5)


def test_a_full_queue_is_refused_not_queued_for_ever(model_dir, store, tokenizer):
    worker = start_worker(model_dir, store, tokenizer, max_batch=1, max_queue=1)
    try:
        # one decoding, one waiting: a third, sent right after, cannot be held (whether or not the
        # worker took the first off the queue yet)
        first, sink = submit(worker, None, [5, 6], max_tokens=200)
        with pytest.raises(Overloaded):
            submit(worker, None, [5, 6], max_tokens=2)
            submit(worker, None, [5, 6], max_tokens=2)
        first.cancelled.set()  # a client that went away leaves at the next step (or is never started)
        deadline = time.monotonic() + 10
        while first.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.finish_reason == "cancelled" and len(first.generated) < 200
        assert not [e for e in sink.events if not isinstance(e, TextEvent)]  # nothing more is sent to a client gone
    finally:
        worker.stop(5)


def test_sampling_is_seeded_and_stop_strings_cut_the_text(model_dir, store, tokenizer):
    worker = start_worker(model_dir, store, tokenizer)
    try:
        runs = []
        for _ in range(2):
            seq, sink = submit(worker, "user-2.v1", [40, 41, 42], max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
            assert sink.done.wait(30)
            runs.append(seq.generated)
        assert runs[0] == runs[1]
        greedy, sink = submit(worker, "user-2.v1", [40, 41, 42], max_tokens=10)
        assert sink.done.wait(30)
        text = sink.text()
        stop = text[len(text) // 2: len(text) // 2 + 2]
        cut, sink = submit(worker, "user-2.v1", [40, 41, 42], max_tokens=10, stop=(stop,))
        assert sink.done.wait(30)
        assert sink.text() == text[: text.find(stop)] and sink.events[-1] == DoneEvent("stop")
    finally:
        worker.stop(5)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a\\b", "x" * 200, "a..b", "é"])
def test_names_that_could_leave_the_store_are_refused(name):
    with pytest.raises(UnknownAdapter):
        check_name(name)


def test_a_symlink_out_of_the_store_is_not_followed(store, tmp_path):
    own = tmp_path / "store"
    own.mkdir()
    os.symlink(store / "user-0.v1", own / "escape")
    with pytest.raises(UnknownAdapter):
        AdapterStore(own).folder("escape")
    with pytest.raises(PermissionError):
        AdapterStore(own).register("x", str(store / "user-0.v1"))  # runtime loading is off


def test_runtime_loading_stays_under_its_root(store, tmp_path):
    root = tmp_path / "runtime"
    root.mkdir()
    import shutil

    shutil.copytree(store / "user-0.v1", root / "mine")
    s = AdapterStore(tmp_path, runtime_root=root)
    with pytest.raises(PermissionError):
        s.register("other", str(store / "user-1.v1"))
    with pytest.raises(PermissionError):
        s.register("other", "../store/user-1.v1")
    s.register("mine-now", "mine")
    assert s.folder("mine-now") == (root / "mine").resolve() and "mine-now" in s.names()
    s.unregister("mine-now")
    with pytest.raises(UnknownAdapter):
        s.folder("mine-now")


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"model": "m"}).encode(), "'prompt'"),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "m", "prompt": "x", "temperature": 9}).encode(), "temperature"),
    (json.dumps({"model": "m", "prompt": "x", "n": 2}).encode(), "'n' must be 1"),
    (json.dumps({"model": "m", "prompt": "x", "stop": ["a"] * 9}).encode(), "stop"),
    (json.dumps({"model": "m", "prompt": ["x"] * 99}).encode(), "prompts"),
])
def test_bad_request_bodies_are_one_line_400s(body, fragment):
    with pytest.raises(RequestError) as err:
        parse(CompletionRequest, body)
    assert err.value.status == 400 and fragment in err.value.message and "\n" not in err.value.message


def test_chat_messages_are_checked():
    with pytest.raises(RequestError, match="role"):
        parse(ChatRequest, json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode())
    req = parse(ChatRequest, json.dumps({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "hi"}]}).encode())
    assert req.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_classify_serves_classifiers_of_different_label_counts(tmp_path):
    """/v1/classify in one process (the app, not a socket): two classifier adapters with 2 and 3
    labels on one tiny BERT encoder, each answer equal to the adapter's own model's softmax."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer, BertConfig, BertModel

    import unilora
    from unilora.models.backbones import SequenceClassifier, resolve_model
    from unilora.serve import ServeSettings, create_app

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    encoder_dir = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(encoder_dir)
    store = tmp_path / "store"
    expected = {}
    texts = ["a fine film", "dull and long", "news of the day"]
    for name, labels in (("two", ["neg", "pos"]), ("three", ["a", "b", "c"])):
        model = unilora.get_model(SequenceClassifier(BertModel.from_pretrained(encoder_dir), len(labels)),
                                  unilora.AdapterConfig(method="unilora", target_modules=["query", "value"], rank=4,
                                                        theta_dim=200, seed=1, modules_to_save=["classifier"]))
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.5)
        model.eval()
        model.save_pretrained(store / name, task={"task": "seq-cls", "label_names": labels, "model": "tiny",
                                                  "max_length": 64})
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected[name] = (labels, torch.softmax(model(**batch).logits, -1))
    settings = ServeSettings(adapters=str(store), model="tiny", task="seq-cls")
    with TestClient(create_app(settings, loaded=(tokenizer, BertModel.from_pretrained(encoder_dir)))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in ("two", "three", "two"):
            answer = client.post("/v1/classify", json={"model": name, "input": texts}).json()
            assert "data" in answer, answer
            labels, probs = expected[name]
            for row, want in zip(answer["data"], probs):
                got = torch.tensor([row["probs"][label] for label in labels])
                assert torch.allclose(got, want, atol=1e-5) and row["label"] == labels[int(want.argmax())]
        assert client.post("/v1/classify", json={"model": "tiny", "input": ["x"]}).status_code == 400
        assert client.post("/v1/classify", json={"model": "nobody", "input": ["x"]}).status_code == 404
        assert client.post("/v1/completions", json={"model": "two", "prompt": "x"}).status_code == 404
