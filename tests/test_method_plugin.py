"""A method is one file: a Projection subclass registered by name, with its recipe on the class and,
where its frozen parts come from the base model's weights, the attach-time hook that receives them.
The toy method here is defined the way a new method's file would be, and runs through the engine,
the recipes and the tools."""

import pytest
import torch
from torch import nn

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main
from unilora.core.layout import Layout, Slot
from unilora.core.registry import PROJECTIONS, register_method
from unilora.methods import build_projection, recipe_config
from unilora.methods.base import Projection, Recipe, copy_into
from unilora.training.recipes import GROUP_LRS, METHOD_DEFAULTS, PAPER_DEFAULTS, finetune_group_lrs

from conftest import build, logits_of


class FrozenSingularA(Projection):
    """ΔW = Bᵀᵀ A with A the top-r right singular vectors of the base weight (from `attach`); only B trains."""

    method = "toy_svd"
    needs_base_weights = True
    recipe = Recipe(defaults=dict(rank=2), group_lrs={"b": 1e-2})

    def __init__(self, layout, config):
        super().__init__(layout, config)
        self.register_buffer("a", torch.zeros(sum(s.a_numel for s in layout.slots)), persistent=False)
        self.b = nn.Parameter(torch.zeros(sum(s.b_numel for s in layout.slots)))

    def attach(self, base_weights):
        rows = [torch.linalg.svd(w.float(), full_matrices=False)[2][: s.rank] for w, s in zip(base_weights, self.layout.slots)]
        self.a.copy_(torch.cat([r.reshape(-1) for r in rows]))

    @property
    def theta(self):
        return self.b

    def factors_from(self, theta):
        a = torch.split(self.a, [s.a_numel for s in self.layout.slots])
        b = torch.split(theta, [s.b_numel for s in self.layout.slots])
        return [(x.view(s.rank, s.in_features), y.view(s.rank, s.out_features)) for x, y, s in zip(a, b, self.layout.slots)]

    @classmethod
    def stored_spec(cls, layout, config):
        return {"toy_svd.b": ((sum(s.b_numel for s in layout.slots),), "float")}

    def param_groups(self):
        return {"b": [self.b]}

    def stored_tensors(self, store=None):
        return {"toy_svd.b": self.b.detach()}

    def load_stored_tensors(self, tensors):
        copy_into(self.b, tensors["toy_svd.b"], "toy_svd.b")


class NoRecipe(FrozenSingularA):
    method = "toy_bare"
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
        projection = build_projection(AdapterConfig(**{**config.to_dict(), "theta_dim": min(config.theta_dim, 500)}),
                                      layout)
        assert set(GROUP_LRS[method]) == set(projection.param_groups())
