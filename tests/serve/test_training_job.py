"""A job's train and eval switches on the served model (serve/training_job.ModeSwitch): the same
flags as `model.train(mode)`, set directly, and `model.train` itself where hub kernels replaced a
layer's forward (their mode then matters)."""

from __future__ import annotations

import torch

from conftest import build
import unilora
from unilora.serve.training_job import ModeSwitch

CONFIG = dict(method="unilora", target_modules=["q_proj", "v_proj", "up_proj"], rank=4, theta_dim=300, dropout=0.2,
              seed=3)


def served_model():
    model = unilora.get_model(build("llama"), unilora.AdapterConfig(**CONFIG), adapter_name="job")
    model.add_adapter("other", unilora.AdapterConfig(**{**CONFIG, "seed": 4}))
    return model.eval()


def test_the_mode_switch_sets_what_train_sets_and_defers_to_train_where_kernels_replaced_a_forward(monkeypatch):
    calls = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: (calls.append(mode), original(self, mode))[1])
    model, switch = served_model(), ModeSwitch()
    calls.clear()
    for training in (True, False, True):
        switch.set(model, training)
        assert all(m.training is training for m in model.modules())
    model.add_adapter("added", unilora.AdapterConfig(**{**CONFIG, "target_modules": ["k_proj"], "seed": 5}))
    switch.set(model, False)  # the new adapter's modules are listed again
    assert not any(m.training for m in model.modules())
    assert calls == []  # flags set directly, no walk through train()

    norm = model.get_base_model().model.norm
    monkeypatch.setattr(type(norm), "kernel_layer_name", "RMSNorm", raising=False)  # transformers' kernel mark
    norm.forward = norm.forward  # a forward set on the instance, as a hub kernel's is
    ModeSwitch().set(model, True)
    assert calls[0] is True and all(m.training for m in model.modules())
