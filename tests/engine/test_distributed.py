"""DDP (gloo, 2 CPU processes): the shared vector is all-reduced, so two ranks on half batches
train exactly like one process on the full batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from unilora import AdapterConfig, get_model

from conftest import build, method_options
from ranks import init_gloo, leave_rank, run_ranks

STEPS = 3


def make_model(method):
    model = get_model(build("bert", seed=0), AdapterConfig(**{**method_options(method), "target_modules": "all-linear",
                                                               "modules_to_save": ["classifier"]}))
    return model.eval()  # no dropout: the comparison must be deterministic


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 96, (4, 8), generator=g), torch.tensor([0, 1, 2, 1])


def train(model, ids, labels, wrapper=None):
    optimizer = torch.optim.SGD(model.parameter_groups(lr=0.5), lr=0.5)
    runner = wrapper or model
    for _ in range(STEPS):
        runner(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rank_main(rank, world, init_file, method, out_file):
    init_gloo(rank, world, init_file)
    model = make_model(method)
    ids, labels = batch()
    half = slice(rank * 2, rank * 2 + 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = train(model, ids[half], labels[half], wrapper=ddp)
    if rank == 0:
        torch.save(params, out_file)
    leave_rank()  # the rank ends here


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unilora", "vblora"])
def test_ddp_matches_single_process_full_batch(method, tmp_path):
    out_file = tmp_path / "ddp.pt"
    run_ranks(_rank_main, lambda attempt: (2, str(tmp_path / f"init{attempt}"), method, str(out_file)))
    ddp_params = torch.load(out_file)
    single = train(make_model(method), *batch())
    assert ddp_params.keys() == single.keys()
    for name in single:
        assert torch.allclose(ddp_params[name], single[name], atol=1e-5), name
    assert not torch.equal(single["projections.default.theta_d" if method == "unilora" else "projections.default.bank"],
                           make_model(method).projection.theta), "training must have moved the shared vector"


@pytest.mark.slow
def test_finetune_cli_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "unilora", "finetune", "--method", "unilora", "--train-limit", "64", "--test-limit", "32",
         "--epochs", "1", "--no-progress", "--out", str(out)],
        check=True, env=env, capture_output=True, timeout=300,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_examples"] == 64
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
