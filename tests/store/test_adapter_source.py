"""The one adapter source (store/source.py) that `unilora serve`, the vLLM resolver and the Ray app read
through: the same hostile names and symlinks are refused by all three, and listed by none."""

import json
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

import unilora
from unilora.deploy.vllm_resolver import UniloraResolution
from unilora.store.names import UnknownAdapter, is_adapter_name
from unilora.store.source import AdapterStore

from conftest import tiny_llama

# names a client may send that must never reach a folder: paths, traversal, and what the rule refuses
HOSTILE_NAMES = ["../good", "good/../good", "/etc", "./good", "good/", "x..y", ".hidden", "", "a" * 129, "good\x00",
                 "go od", "..", "%2e%2e/good"]
# folders inside the store that must not be served: they leave it through symlinks, or are not whole
ESCAPING = ["escape", "halfway", "noweights"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    base = root / "tiny-base"  # the served name below, org/tiny-base, ends the same
    tiny_llama().save_pretrained(base)
    model = unilora.get_model(LlamaForCausalLM.from_pretrained(base),
                              unilora.AdapterConfig(method="unilora", target_modules=["q_proj"], theta_dim=64))
    store, outside = root / "store", root / "outside"
    model.save_pretrained(store / "good")
    model.save_pretrained(outside / "secret")
    (store / "escape").symlink_to(outside / "secret")  # a whole folder outside the store
    (store / "halfway").mkdir()  # its own config, but the weights are a file outside the store
    shutil.copy(store / "good" / "adapter_config.json", store / "halfway")
    (store / "halfway" / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    (store / "noweights").mkdir()
    shutil.copy(store / "good" / "adapter_config.json", store / "noweights")
    return store


def test_the_store_lists_and_opens_only_usable_adapters(store):
    source = AdapterStore(store)
    assert source.names() == ["good"]
    assert source.folder("good") == store / "good"
    for name in HOSTILE_NAMES + ESCAPING:
        with pytest.raises(UnknownAdapter):
            source.folder(name)
        with pytest.raises(UnknownAdapter):
            source.read(name)


def test_the_vllm_resolver_refuses_the_same(store, tmp_path):
    resolution = UniloraResolution(str(store), tmp_path / "cache")
    assert resolution.resolve("org/tiny-base", "good") is not None
    for name in HOSTILE_NAMES + ESCAPING:
        assert resolution.resolve("org/tiny-base", name) is None, name
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["good"]  # nothing else expanded


def test_ray_routes_only_plain_names(store):
    """The Ray router takes the adapter name from the body for routing only; a replica then reads it
    through the same store (tests/deploy/test_ray.py sends hostile names to a running cluster)."""
    from unilora.deploy.ray_app import adapter_name
    from unilora.serve.settings import ServeSettings

    settings = ServeSettings(adapters=str(store), model="base")
    assert adapter_name(b'{"model": "good"}', settings) == "good"
    for name in HOSTILE_NAMES:
        assert not is_adapter_name(name)
        body = json.dumps({"model": name}).encode()
        assert adapter_name(body, settings) == "", name
