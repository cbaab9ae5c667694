"""A method is one file: a Projection subclass registered by name, with its options (fields, defaults,
checks, command-line help), its recipe, its one trained vector, its PEFT mapping both ways and, where its
frozen parts come from the base model's weights, the attach-time hook that receives them. The toy
method here is defined the way a new method's file would be (nothing outside this file knows it), and
runs through the config, the command line, the engine, the recipes and the tools."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main
from unilora.core.config import MethodOptions, Number, option
from unilora.core.layout import Layout, Slot
from unilora.core.registry import PROJECTIONS, register_method
from unilora.core.targeting import base_module, linear_shape
from unilora.methods import build_projection, recipe_config
from unilora.methods.base import Projection, Recipe, TrainedVector
from unilora.methods.peft_format import PeftReading, layer_key
from unilora.tools.peft_native import from_peft, to_peft
from unilora.training.recipes import GROUP_LRS, METHOD_DEFAULTS, PAPER_DEFAULTS, finetune_group_lrs

from conftest import build, logits_of


@dataclass
class ToyOptions(MethodOptions):
    b_scale: float = option(1.0, Number(0.0, open_low=True), "multiplies B")


class FrozenSingularA(Projection):
    """ΔW = b_scale · Bᵀᵀ A with A the top-r right singular vectors of the base weight (from `attach`);
    only B trains."""

    method = "toy_svd"
    options = ToyOptions
    vector = TrainedVector("b", "toy_svd.b", "b")
    peft_type = "TOY_SVD"
    peft_needs_model = "weights"
    needs_base_weights = True
    recipe = Recipe(defaults=dict(rank=2), group_lrs={"b": 1e-2})

    def __init__(self, layout, config):
        super().__init__(layout, config)
        self.register_buffer("a", torch.zeros(sum(s.a_numel for s in layout.slots)), persistent=False)
        self.b = nn.Parameter(torch.zeros(self.vector_length(layout, config)))

    def attach(self, base_weights):
        rows = [torch.linalg.svd(w.float(), full_matrices=False)[2][: s.rank] for w, s in zip(base_weights, self.layout.slots)]
        self.a.copy_(torch.cat([r.reshape(-1) for r in rows]))

    def factors_from(self, theta):
        a = torch.split(self.a, [s.a_numel for s in self.layout.slots])
        b = torch.split(theta * self.config.b_scale, [s.b_numel for s in self.layout.slots])
        return [(x.view(s.rank, s.in_features), y.view(s.rank, s.out_features)) for x, y, s in zip(a, b, self.layout.slots)]

    @classmethod
    def vector_length(cls, layout, config):
        return sum(s.b_numel for s in layout.slots)

    def peft_state(self, names, save_projection=True):
        parts = torch.split(self.b.detach(), [s.b_numel for s in self.layout.slots])
        return {layer_key(name, "toy_svd_b"): part.clone() for name, part in zip(names, parts)}

    def peft_config(self, save_projection=True):
        return {"b_scale": self.config.b_scale}

    @classmethod
    def from_peft(cls, source):
        (r,) = source.integers("r")
        order = source.model_order(set(source.modules("toy_svd_b")), "TOY_SVD")
        slots = [Slot(name, *linear_shape(base_module(source.model, name)), r) for name in order]
        b = torch.cat([source.tensor(layer_key(name, "toy_svd_b")) for name in order])
        return PeftReading(slots, dict(method=cls.method, rank=r, b_scale=source.config["b_scale"]), {"toy_svd.b": b})


class NoRecipe(FrozenSingularA):
    method = "toy_bare"
    peft_type = None  # one method per PEFT type (the registry refuses a second)
    needs_base_weights = False
    recipe = None

    def attach(self, base_weights):  # pragma: no cover - never called for a method without the flag
        raise AssertionError("attach is for methods that need the base weights")


@pytest.fixture
def toy_methods():
    """The toy methods, registered for one test only."""
    for cls in (FrozenSingularA, NoRecipe):
        register_method(cls)
    yield
    for cls in (FrozenSingularA, NoRecipe):
        del PROJECTIONS[cls.method]


def toy_model(arch="llama"):
    return get_model(build(arch), AdapterConfig(method="toy_svd", rank=2, target_modules="all-linear"))


def test_a_registered_method_runs_through_the_engine(toy_methods, ids, tmp_path):
    assert "toy_svd" in unilora.METHODS and AdapterConfig(method="toy_svd").method == "toy_svd"
    for arch in ("llama", "gpt2"):  # GPT-2's Conv1D keeps its weight as in × out: attach gets out × in
        model = toy_model(arch)
        base = model.get_base_model()
        for (a, _), slot in zip(model.projection.factors(), model.layout.slots):
            layer = base.get_submodule(slot.name).base_layer
            weight = layer.weight.t() if arch == "gpt2" else layer.weight
            assert torch.allclose(a @ weight.float().t() @ weight.float() @ a.t(),
                                  torch.diag(torch.linalg.svdvals(weight.float())[:2] ** 2), atol=1e-4)
    model = toy_model()
    model.train()
    logits_of(model, ids).sum().backward()
    assert model.projection.b.grad.abs().sum() > 0 and model.projection.a.grad is None
    with torch.no_grad():
        model.projection.b.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.eval()
    unmerged = logits_of(model, ids)
    model.save_pretrained(tmp_path / "toy")
    loaded = unilora.from_pretrained(build("llama"), tmp_path / "toy")  # attach rebuilds A from the new model
    assert torch.equal(logits_of(loaded, ids), unmerged)
    loaded.merge()
    assert torch.allclose(logits_of(loaded, ids), unmerged, atol=1e-5)


def test_a_methods_recipe_lives_on_its_class(toy_methods):
    assert recipe_config("toy_svd", ["q_proj"]).rank == 2 and METHOD_DEFAULTS["toy_svd"] == {"rank": 2}
    # the adapter's seed where given (--adapter-seed), else the run's
    assert [recipe_config("toy_svd", ["q_proj"], run_seed=2, seed=s).seed for s in (None, 0, 4)] == [2, 0, 4]
    assert GROUP_LRS["toy_svd"] == {"b": 1e-2} and finetune_group_lrs("toy_svd", False) == ({"b": 1e-2}, True)
    assert "toy_svd" not in PAPER_DEFAULTS and "toy_bare" not in GROUP_LRS
    with pytest.raises(UniLoraError, match="'toy_svd' records no paper settings"):
        recipe_config("toy_svd", ["q_proj"], paper=True)
    with pytest.raises(UniLoraError, match="'toy_bare' has no recipe"):
        finetune_group_lrs("toy_bare", True)


def test_without_its_base_model_a_method_counts_but_builds_no_factors(toy_methods, ids, tmp_path, capsys):
    toy_model().save_pretrained(tmp_path / "toy")
    assert main(["inspect", str(tmp_path / "toy")]) == 0  # what the file holds needs no model
    assert "stored_params: 1,024" in capsys.readouterr().out
    # export rebuilds the factors from the base model the adapter records: a random-init model records none
    assert main(["export", str(tmp_path / "toy"), str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the adapter records no base model") and len(err.splitlines()) == 1
    layout = Layout([Slot("x", 8, 6, 2)])
    unattached = build_projection(AdapterConfig(method="toy_svd", rank=2), layout)
    assert unattached.stored_param_count() == 12
    with pytest.raises(UniLoraError, match="no frozen factors: they come from the base model's weights"):
        unattached.factors()
    with torch.device("meta"):
        skeleton = build("llama")
    model = get_model(skeleton, AdapterConfig(method="toy_svd", rank=2, target_modules=["q_proj"]))
    assert model.stored_param_count() == 2 * 2 * 32  # counted on the meta device (`unilora count`)
    with pytest.raises(UniLoraError, match="added to a model on the meta device"):
        model.projection.factors()


@pytest.mark.parametrize("method", list(unilora.METHODS))
def test_every_recipe_fits_its_method(method):
    """The recipe's groups are the method's parameter groups, and its settings build a projection."""
    layout = Layout([Slot("a", 256, 128, 4), Slot("b", 128, 256, 4)])
    for paper in (False, True):
        config = recipe_config(method, ["a", "b"], paper=paper, tuned_model=False, theta_dim=None)
        small = {"theta_dim": min(config.theta_dim, 500)} if "theta_dim" in config.to_dict() else {}
        projection = build_projection(config.replace(**small), layout)
        assert set(GROUP_LRS[method]) == set(projection.param_groups())


def test_a_methods_options_live_in_its_file(toy_methods, tmp_path, capsys):
    """The toy's own field: a default, a check, a command-line option, recorded in its adapters only."""
    assert AdapterConfig(method="toy_svd").b_scale == 1.0
    with pytest.raises(UniLoraError, match="b_scale must be a finite number > 0, got -1"):
        AdapterConfig(method="toy_svd", b_scale=-1)
    assert "b_scale" not in AdapterConfig(method="unilora", b_scale=3.0).to_dict()  # another method's: ignored
    with pytest.raises(UniLoraError, match="b_scale must be a finite number > 0"):
        AdapterConfig(method="unilora", b_scale="x")  # ignored, yet a damaged value is refused
    assert main(["finetune", "--help"]) == 0
    assert "--b-scale B_SCALE toy_svd, toy_bare: multiplies B" in " ".join(capsys.readouterr().out.split())
    model = get_model(build("llama"), AdapterConfig(method="toy_svd", rank=2, b_scale=3.0, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "toy")
    assert unilora.from_pretrained(build("llama"), tmp_path / "toy").adapter_config.b_scale == 3.0


def test_a_methods_peft_mapping_lives_in_its_file(toy_methods, ids, tmp_path):
    """Ours to the toy's PEFT format and back, through the generic convert, with the same outputs."""
    model = get_model(build("llama"), AdapterConfig(method="toy_svd", rank=2, b_scale=0.5, target_modules="all-linear"))
    with torch.no_grad():
        model.projection.b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.eval()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "toy")
    assert to_peft(tmp_path / "toy", tmp_path / "peft", model=build("llama"))[0].startswith("wrote PEFT TOY_SVD")
    assert from_peft(tmp_path / "peft", tmp_path / "back", model=build("llama"))[0].startswith(
        "wrote unilora toy_svd adapter")
    back = unilora.from_pretrained(build("llama"), tmp_path / "back").eval()
    assert back.adapter_config.b_scale == 0.5
    assert torch.allclose(logits_of(back, ids), expected, atol=1e-6)
