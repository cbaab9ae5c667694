"""FSDP2 (fully_shard per block, gloo, 2 CPU processes) trains the shared vector exactly like one
process on the full batch."""

import pytest
import torch

from unilora import AdapterConfig, get_model
from unilora.engine.distributed import fully_shard_adapted, transformer_blocks

from conftest import build, method_options
from ranks import init_gloo, leave_rank, run_ranks

STEPS = 3


def make_model(method):
    return get_model(build("llama", seed=0), AdapterConfig(**{**method_options(method), "target_modules": "all-linear"}))


def batch():
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(5))
    return ids


def train(model, ids):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _rank_main(rank, world, init_file, method, out_file):
    init_gloo(rank, world, init_file)
    model = make_model(method)
    fully_shard_adapted(model)
    train(model, batch()[rank * 2 : rank * 2 + 2])
    full = {n: p.full_tensor().detach().clone() for n, p in model.projection.named_parameters()}
    if rank == 0:
        torch.save(full, out_file)
    leave_rank()  # the rank ends here


def test_blocks_are_found_from_the_model():
    model = make_model("unilora")
    assert [type(b).__name__ for b in transformer_blocks(model)] == ["LlamaDecoderLayer"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unilora", "vblora", "lora_xs", "tinylora"])
def test_fsdp2_matches_single_process_full_batch(method, tmp_path):
    out_file = tmp_path / "fsdp.pt"
    run_ranks(_rank_main, lambda attempt: (2, str(tmp_path / f"init{attempt}"), method, str(out_file)))
    sharded = torch.load(out_file)
    single = make_model(method)
    start = {n: p.detach().clone() for n, p in single.projection.named_parameters()}
    train(single, batch())
    for name, p in single.projection.named_parameters():
        # the two half batches are averaged by FSDP; the full-batch loss is their mean too
        assert torch.allclose(sharded[name], p, atol=1e-5), name
        assert not torch.equal(p, start[name]) or name.endswith("logits"), f"{name} did not train"
