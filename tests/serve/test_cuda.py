"""On a CUDA GPU (scripts/gpu_check.sh runs these; elsewhere they skip, saying why): a bf16
training step, a mixed-adapter batch equal to each adapter alone, merge equal to unmerged, and the
server's worker generating on the GPU exactly as `model.generate` does there."""

import threading
import time

import pytest
import torch

import unilora
from conftest import build, method_options
from unilora.serve.residency import Residency
from unilora.serve.adapters import prepare_adapter
from unilora.serve.sampling import Sampling
from unilora.serve.scheduler import Scheduler
from unilora.serve.sequence import DoneEvent, ErrorEvent, Sequence
from unilora.store.source import AdapterStore
from unilora.serve.worker import Worker

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]
METHODS = ["lora", "unilora", "vblora", "vera", "tied_lora", "fastfood"]


def adapted(method: str, dtype=torch.float32, seed: int = 3):
    base = build("llama").to("cuda", dtype)
    options = {**method_options(method), "seed": seed}
    model = unilora.get_model(base, unilora.AdapterConfig(target_modules=["q_proj", "v_proj"], **options))
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_training_step_moves_only_the_adapter(method):
    model = adapted(method, torch.bfloat16).train()
    ids = torch.randint(0, 96, (4, 12), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_a_mixed_adapter_batch_on_the_gpu_equals_each_adapter_alone():
    model = adapted("unilora")
    model.add_adapter("other", unilora.AdapterConfig(target_modules=["q_proj", "v_proj"], **method_options("vblora")))
    for param in model.projections["other"].parameters():
        param.data.normal_(0, 0.3)
    model.eval()
    ids = torch.randint(0, 96, (3, 9), device="cuda")
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits
        alone = []
        for row, name in enumerate(["default", "other"]):
            model.set_adapter(name)
            alone.append(model(input_ids=ids[row:row + 1]).logits)
        with model.disable_adapter():
            alone.append(model(input_ids=ids[2:3]).logits)
    assert torch.allclose(mixed, torch.cat(alone), atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_on_the_gpu(method):
    model = adapted(method).eval()
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.merge()
        merged = model(input_ids=ids).logits
    assert torch.allclose(before, merged, atol=1e-4)


def test_the_servers_worker_generates_on_the_gpu_as_generate_does(tmp_path):
    model = adapted("unilora").eval()
    model.save_pretrained(tmp_path / "store" / "a")
    base = build("llama").to("cuda").eval()

    class Tokens:  # ids in, ids out: the worker only needs decode and the special ids
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    residency = Residency(base, 10, 1 << 30, 1 << 26)
    worker = Worker(Scheduler(residency, Tokens(), max_batch=8, max_queue=8), max_queue=8)
    worker.start()
    try:
        adapter = prepare_adapter(AdapterStore(tmp_path / "store"), residency, "a", 1, residency.shape)
        done = threading.Event()
        seq = Sequence(adapter, [5, 6, 7, 8], Sampling(max_tokens=10, temperature=0),
                       lambda e: done.set() if isinstance(e, (DoneEvent, ErrorEvent)) else None, time.monotonic() + 60)
        worker.submit([seq])
        assert done.wait(60)
    finally:
        worker.stop(5)
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]], device="cuda"), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, 4:].tolist()
    # the worker stops at an end-of-sequence token, where generate pads on
    assert seq.generated == expected[: len(seq.generated)] and len(seq.generated) >= 1
