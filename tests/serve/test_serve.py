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
from unilora.serve.sampling import Sampling, sampling_of
from unilora.serve.batch import PromptInProgress
from unilora.serve.scheduler import Overloaded, Scheduler, plan_prefill
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
        self.events, self.done, self.finished_at = [], threading.Event(), None

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (DoneEvent, ErrorEvent)):
            self.finished_at = time.monotonic()
            self.done.set()

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextEvent))


def start_worker(model_dir, store, tokenizer, max_resident=100, max_batch=32, max_queue=64, max_iteration_tokens=256):
    base = LlamaForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    residency = Residency(base, max_resident, 1 << 30, 1 << 26)
    scheduler = Scheduler(residency, tokenizer, max_batch=max_batch, max_queue=max_queue,
                          max_iteration_tokens=max_iteration_tokens)
    worker = Worker(scheduler, max_queue=max_queue)
    worker.residency, worker.store, worker.eos_ids = residency, AdapterStore(store), worker.scheduler.eos_ids
    worker.start()
    return worker


def prepared(worker, name, ids, max_tokens, **sampling):
    """A sequence as a request makes it: the adapter prepared (held if resident, else read and checked)."""
    sink = Collector()
    adapter = prepare_adapter(worker.store, worker.residency, name, 1, worker.residency.shape) if name else None
    seq = Sequence(adapter, ids, Sampling(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0), **sampling),
                   sink, time.monotonic() + 60)
    return seq, sink


def submit(worker, name, ids, max_tokens, **sampling):
    seq, sink = prepared(worker, name, ids, max_tokens, **sampling)
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


def test_prompts_read_in_chunks_give_what_each_adapter_gives_alone(model_dir, store, tokenizer):
    """A budget of 7 tokens per turn: most prompts (up to 60 tokens) are prefilled over several turns
    on their own caches, beside rows of other adapters decoding; every method and the base model
    still give exactly their greedy tokens alone."""
    worker = start_worker(model_dir, store, tokenizer, max_iteration_tokens=7)
    try:
        generator = torch.Generator().manual_seed(1)
        names = [f"user-{i}.v1" for i in range(8)] + [None, "user-5.v1"]
        lengths = [60, 3, 25, 9, 41, 17, 2, 33, 50, 6]
        prompts = [torch.randint(10, 5000, (n,), generator=generator).tolist() for n in lengths]
        submitted = []
        for i, (name, ids) in enumerate(zip(names, prompts)):
            submitted.append(submit(worker, name, ids, max_tokens=8))
            time.sleep(0.01 * (i % 3))
        for seq, sink in submitted:
            assert sink.done.wait(60), "generation did not finish"
            assert isinstance(sink.events[-1], DoneEvent), sink.events[-1]
        for (seq, _), name, ids in zip(submitted, names, prompts):
            expected = isolated_greedy(model_dir, store / name if name else None, ids, 8)
            got = seq.generated
            assert got == expected[: len(got)] and (len(got) == len(expected) or got[-1] in worker.eos_ids), name
    finally:
        worker.stop(5)


def test_a_short_request_is_answered_while_a_long_prompt_is_still_being_read(model_dir, store, tokenizer):
    """Head of line: with 16 tokens per turn, a 240-token prompt takes 15 turns or more to read; a
    2-token request sent after its first chunk is finished before the long one has its first token."""
    worker = start_worker(model_dir, store, tokenizer, max_iteration_tokens=16)
    try:
        long_ids = torch.randint(10, 5000, (240,), generator=torch.Generator().manual_seed(2)).tolist()
        long_seq, long_sink = prepared(worker, "user-1.v1", long_ids, max_tokens=4)
        short_seq, short_sink = prepared(worker, "user-2.v1", [11, 12, 13], max_tokens=2)
        worker.submit([long_seq])
        while not any(p.done for p in worker.scheduler.prompts) and long_seq.first_token_at is None:
            time.sleep(0.0005)  # the long prompt's first chunk is read
        worker.submit([short_seq])
        assert short_sink.done.wait(30) and long_sink.done.wait(60)
        assert isinstance(short_sink.events[-1], DoneEvent) and len(short_seq.generated) == 2
        assert short_sink.finished_at < long_seq.first_token_at
        expected = isolated_greedy(model_dir, store / "user-1.v1", long_ids, 4)
        assert long_seq.generated == expected[: len(long_seq.generated)]
    finally:
        worker.stop(5)


def test_a_timeout_or_a_disconnect_ends_a_prompt_between_its_chunks(model_dir, store, tokenizer):
    """4 tokens per turn: a 240-token prompt needs 60 turns to read. Caught part-way, a request whose
    time is up fails with 504 and one whose client left ends quietly, at the next turn; nothing is
    generated for either and the server is idle again."""
    worker = start_worker(model_dir, store, tokenizer, max_iteration_tokens=4)
    try:
        ids = torch.randint(10, 5000, (240,), generator=torch.Generator().manual_seed(3)).tolist()
        for ending in ("timeout", "disconnect"):
            seq, sink = submit(worker, "user-0.v1", ids, max_tokens=4)
            while not any(p.done for p in worker.scheduler.prompts):
                time.sleep(0.0005)
            in_progress = worker.scheduler.prompts[0]
            if ending == "timeout":
                seq.deadline = time.monotonic()
            else:
                seq.cancelled.set()
            deadline = time.monotonic() + 30
            while worker.scheduler.has_work and time.monotonic() < deadline:
                time.sleep(0.001)
            assert not worker.scheduler.has_work and seq.generated == []
            assert 0 < in_progress.done < 240, "it ended part-way through its prompt"
            if ending == "timeout":
                assert isinstance(sink.events[-1], ErrorEvent) and sink.events[-1].status == 504, sink.events
                assert "timed out" in sink.events[-1].message
            else:
                assert seq.finish_reason == "cancelled" and sink.events == []
    finally:
        worker.stop(5)


def test_the_prefill_plan_spends_the_budget_short_prompts_first():
    def prompt(n, done=0):
        return PromptInProgress(Sequence(None, list(range(n)), Sampling(max_tokens=1), lambda e: None, 0.0), "base",
                                done=done)

    a, b, c = prompt(100), prompt(10), prompt(20)
    whole, chunked, n = plan_prefill([a, b, c], 64)
    assert whole == [b, c] and chunked is a and n == 64 - 2 * 20  # padded width counted: 2 rows of 20
    under_way, short = prompt(100, done=40), prompt(50)
    whole, chunked, n = plan_prefill([under_way, short], 64)
    assert whole == [] and chunked is under_way and n == 60  # a quarter is kept for it, so 50 does not fit
    whole, chunked, n = plan_prefill([under_way, prompt(30)], 64)
    assert len(whole) == 1 and chunked is under_way and n == 34
    one = prompt(5)
    assert plan_prefill([one], 1) == ([], one, 1)  # a budget of one token still moves


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
    (b'{"model": "m", "prompt": "x", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nests JSON deeper than 32"),
    (b'{"model": "m", "prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}", "nests JSON deeper than 32"),
    (json.dumps({"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}).encode(),
     "'response_format'"),
    (json.dumps({"model": "m", "prompt": "x", "tool_choice": "auto"}).encode(), "'tool_choice'"),
    (json.dumps({"model": "m", "prompt": "x", "logit_bias": {"x": 1}}).encode(), "token ids"),
    (json.dumps({"model": "m", "prompt": "x", "logit_bias": {"5": 101}}).encode(), "-100 to 100"),
    (json.dumps({"model": "m", "prompt": "x", "presence_penalty": 2.5}).encode(), "presence_penalty"),
    (json.dumps({"model": "m", "prompt": "x", "logprobs": 6}).encode(), "logprobs"),
])
def test_bad_request_bodies_are_one_line_400s(body, fragment):
    with pytest.raises(RequestError) as err:
        parse(CompletionRequest, body)
    assert err.value.status == 400 and fragment in err.value.message and "\n" not in err.value.message


def test_chat_fields_that_need_each_other_and_the_limits_name_the_field_asked():
    with pytest.raises(RequestError, match="'top_logprobs' needs 'logprobs': true"):
        parse(ChatRequest, json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                       "top_logprobs": 2}).encode())
    chat = parse(ChatRequest, json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          "max_completion_tokens": 99, "logit_bias": {"7": -3}}).encode())
    with pytest.raises(RequestError, match="'max_completion_tokens' is 99, above this server's limit of 50"):
        sampling_of(chat, 50, 256, [3], None)
    with pytest.raises(RequestError, match="'logit_bias' names token 7, and this model's vocabulary has 7 tokens"):
        sampling_of(chat.model_copy(update={"max_completion_tokens": 5}), 50, 256, [3], None, vocab_size=7)
    assert sampling_of(chat.model_copy(update={"max_completion_tokens": 5}), 50, 256, [3], None,
                       vocab_size=8).logit_bias == ((7, -3.0),)


def test_bias_and_penalties_follow_openais_definitions():
    logits = torch.tensor([3.0, 2.9, 2.0, -1.0])
    assert Sampling(max_tokens=1, temperature=0).choose(logits, None, [0]) == 0
    assert Sampling(max_tokens=1, temperature=0, frequency_penalty=0.2).choose(logits, None, [0]) == 1
    # frequency counts every occurrence, presence once: 3 - 3 * 0.3 = 2.1 < 2.9 - 0.3 ... and 2.0 wins over both
    penalised = Sampling(max_tokens=1, frequency_penalty=0.3, presence_penalty=0.7).adjusted(logits, [0, 0, 0, 1])
    assert torch.allclose(penalised, torch.tensor([3.0 - 0.9 - 0.7, 2.9 - 0.3 - 0.7, 2.0, -1.0]))
    assert Sampling(max_tokens=1, temperature=0, logit_bias=((3, 100.0),)).choose(logits, None) == 3
    rng = torch.Generator().manual_seed(0)
    banned = Sampling(max_tokens=1, temperature=1.0, logit_bias=((0, -100.0), (1, -100.0)))
    assert {banned.choose(logits, rng) for _ in range(200)} <= {2, 3}
    untouched = Sampling(max_tokens=1)
    assert untouched.adjusted(logits, [0, 1]) is logits  # no copy when nothing applies


def test_logprobs_are_the_models_own_for_every_token(model_dir, store, tokenizer):
    """Greedy with 3 alternatives: each token's log-probability equals log-softmax of the adapter's
    logits at that position (a plain forward over prompt + generated), and it is the top one."""
    worker = start_worker(model_dir, store, tokenizer)
    try:
        ids = [40, 41, 42, 43]
        seq, sink = submit(worker, "user-3.v1", ids, max_tokens=6, top_logprobs=3)
        assert sink.done.wait(30) and isinstance(sink.events[-1], DoneEvent)
        entries = [e for event in sink.events if isinstance(event, TextEvent) for e in event.logprobs]
        kept = [t for t in seq.generated if t not in worker.eos_ids]
        assert len(entries) == len(kept) > 0
        import unilora

        model = unilora.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), store / "user-3.v1").eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + seq.generated])).logits[0]
        expected = torch.log_softmax(logits[len(ids) - 1:-1].float(), -1)
        for i, (token, entry) in enumerate(zip(kept, entries)):
            assert entry.token == tokenizer.decode([token])
            assert abs(entry.logprob - float(expected[i, token])) < 1e-4
            assert len(entry.top) == 3 and entry.top[0][0] == entry.token and entry.top[0][1] >= entry.top[1][1]
        plain, sink = submit(worker, "user-3.v1", ids, max_tokens=6)
        assert sink.done.wait(30) and all(e.logprobs == () for e in sink.events if isinstance(e, TextEvent))
        assert plain.generated == seq.generated
    finally:
        worker.stop(5)


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


def test_a_bug_of_ours_is_a_500_in_the_error_shape_counted_under_its_endpoint(model_dir, store, tokenizer):
    from fastapi.testclient import TestClient

    from unilora.serve.app import create_app
    from unilora.serve.settings import ServeSettings

    app = create_app(ServeSettings(adapters=str(store), model=str(model_dir), drain_timeout=1),
                     loaded=(tokenizer, LlamaForCausalLM.from_pretrained(model_dir)))
    with TestClient(app, raise_server_exceptions=False) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)

        def broken(prompt):
            raise RuntimeError("a bug")

        app.state.server.encode = broken
        answer = http.post("/v1/completions", json={"model": "user-0.v1", "prompt": "x"})
        assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
        assert "RuntimeError" in answer.json()["error"]["message"]
        metrics = http.get("/metrics").text
        assert 'unilora_requests_total{endpoint="/v1/completions",status="500"} 1.0' in metrics
        assert 'endpoint="other",status="500"' not in metrics
