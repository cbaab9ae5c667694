"""Learning rates and settings where the user leaves them open: each method's recipe (on its class,
methods/) read by name, the classifier head's rate, and the rules that adapt the recipe's rates to
a run (`finetune`'s options, another model's sharing D/d, a distilled student).

The recipes were tuned on one budget: 126 optimizer steps on Rotten Tomatoes with the embedded
MiniLM, all linear layers adapted (scripts/tune_rates.sh, docs/results.md). Their defaults make
Uni-LoRA and VB-LoRA store <= 3 % of LoRA's parameters on the same layers. The papers' rates (bank
1e-3, logits 1e-2, θ_d 5e-3) are meant for schedules of 20+ epochs and left the small methods
under-fitted at that budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable

from ..core.errors import UniLoraError
from ..core.registry import PROJECTIONS
from ..core.tasks import TASK_KINDS
from ..methods import Recipe, recipe_of

HEAD_LR = 5e-3  # a classifier's head, trained in full


class _ByMethod(Mapping):
    """{method: what its recipe holds} over the registered methods that have it (read live, so a
    method registered later is there too)."""

    def __init__(self, read: Callable[[Recipe], object]):
        self._read = read

    def _value(self, method: str):
        cls = PROJECTIONS.get(method)
        return None if cls is None or cls.recipe is None else self._read(cls.recipe)

    def __getitem__(self, method: str):
        value = self._value(method)
        if value is None:
            raise KeyError(method)
        return value

    def __iter__(self) -> Iterator[str]:
        return (method for method in PROJECTIONS if self._value(method) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


METHOD_DEFAULTS = _ByMethod(lambda recipe: recipe.defaults)
GROUP_LRS = _ByMethod(lambda recipe: recipe.group_lrs)
PAPER_DEFAULTS = _ByMethod(lambda recipe: recipe.paper)
TUNED_SHARING = _ByMethod(lambda recipe: recipe.tuned_sharing)
# per teacher kind: {method: the rates that replace its recipe's for a distilled student}
DISTILL_GROUP_LRS = {kind: _ByMethod(lambda recipe, kind=kind: recipe.distill_group_lrs.get(kind) or None)
                     for kind in TASK_KINDS}


def finetune_group_lrs(method: str, classify: bool, lr: float | None = None, head_lr: float | None = None,
                       given: dict[str, float] | None = None) -> tuple[dict[str, float], bool]:
    """`finetune`'s rates: the recipe's per group (and the head's, for a classifier), `lr` for every
    adapter group, then the groups `given`. Returns (rates, whether the θ rate is still the recipe's,
    to be fitted to the model's sharing)."""
    if head_lr is not None and not classify:
        raise UniLoraError("--head-lr sets the classifier head's rate; a causal LM has no head to train")
    given = dict(given or {})
    rates = {**recipe_of(method).group_lrs, **({"head": head_lr or HEAD_LR} if classify else {})}
    if lr is not None:
        rates = {group: (rate if group == "head" else lr) for group, rate in rates.items()}
    rates.update(given)
    return rates, lr is None and "theta" not in given


def distillation_group_lrs(kind: str, method: str) -> dict[str, float]:
    """The rates a `kind` teacher's ("seq-cls" or "causal-lm") student of `method` trains at."""
    recipe = recipe_of(method)
    return {**recipe.group_lrs, **recipe.distill_group_lrs.get(kind, {})}


# Which of a classifier's pooled features a distilled student matches: "last" (the head's input) or
# "all" (also every inner encoder layer's output, pooled the same way). "all": on seeds 5-7, held-out
# KL to the teacher fell in 10 of 12 runs against "last" (and rose by 0.0001 and 5 % in the two
# others), by 8-19 % for VB-LoRA on Rotten Tomatoes, at the same cost (docs/results.md).
HIDDEN_LAYERS = ("last", "all")
DEFAULT_HIDDEN_LAYERS = "all"


# A θ rate tuned where each θ_d entry feeds D/d entries of θ_D (Recipe.tuned_sharing: 18.4 for
# Uni-LoRA on MiniLM). Adam moves each θ_d entry by about the rate; the loss falls per step by about
# rate x d x (typical gradient), against LoRA's rate x D, so a larger D/d needs a proportionally
# larger rate to train as fast. On SmolLM2-135M (all linear, D/d = 135.7; BBC headlines, 12 steps,
# seeds 100 and 101, not in the reported table) eval loss went 4.24 / 3.42 / 2.96 / 2.96 at 2e-2 /
# 5e-2 / 1.2e-1 / 1.47e-1, against LoRA's 2.81. The default keeps the tuned rate per unit of D/d:
# rate x (D/d) / tuned D/d. It never lowers the tuned rate (at D/d below the tuned one there is no
# evidence for less; on MiniLM twice the rate scored the same).
CLI_RATE_OVERRIDE = "--group-lr theta=RATE sets your own"


def fitted_group_lrs(method: str, group_lrs: dict[str, float], D: int, theta_dim: int,
                     override: str = CLI_RATE_OVERRIDE) -> tuple[dict, str | None]:
    """The recipe's rates with the θ rate scaled to this model's D/d; (rates, a note saying so, ending
    with how the user sets another rate: `override`)."""
    if method not in TUNED_SHARING or "theta" not in group_lrs:
        return dict(group_lrs), None
    factor = (D / theta_dim) / TUNED_SHARING[method]
    if factor < 1.01:
        return dict(group_lrs), None
    rates = {**group_lrs, "theta": group_lrs["theta"] * factor}
    note = (f"θ learning rate {rates['theta']:.3g} = {group_lrs['theta']:.3g} x {factor:.2f}: each θ_d entry feeds "
            f"D/d = {D / theta_dim:.1f} LoRA weights here, {TUNED_SHARING[method]:.1f} where the rate was tuned "
            f"({override})")
    return rates, note
