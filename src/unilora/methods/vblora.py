"""VB-LoRA (seed 003): every length-b sub-vector of every rank-one component vector (rows of A,
columns of B) is a top-k softmax mix of a shared bank of h vectors.

θ_D's layout makes each component vector contiguous, so all sub-vectors of the whole model are
one (n_sub × b) matrix: one top-k, one gather, one weighted sum per forward.
Given the selection (indices and weights), θ_D is linear in the bank: that is the P tested.

Selection modes (seed 003 Table 5): "topk" (default, noise-free), "all" (softmax over the whole
bank), "noisy_topk", "gumbel", "st_gumbel". Noise and Gumbel sampling act in training only; in
eval every mode but "all" uses the noise-free top-k, which is exactly what the adapter stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Choice, Integer, MethodOptions, Number, option
from ..core.errors import UniLoraError
from ..core.layout import Slot
from ..core.notes import note
from ..core.registry import register_method
from .base import Projection, Recipe, copy_into
from .peft_format import PeftReading, layer_key, shared_key

# Logits that an adapter saved in top-k form did not keep are rebuilt this far below the
# smallest kept logit: the top-k and their softmax weights are then exactly as saved.
_REBUILT_LOGIT_MARGIN = 10.0


MAX_AUTO_VECTOR_LENGTH = 256
SELECTIONS = ("topk", "all", "noisy_topk", "gumbel", "st_gumbel")


@dataclass
class VBLoRAOptions(MethodOptions):
    num_vectors: int = option(90, Integer(1, 2**31 - 1), "bank size h")
    vector_length: int | None = option(None, Integer(1, 2**31 - 1, optional=True),
                                       "sub-vector length b (default: the largest b <= 256 dividing every adapted "
                                       "dimension)")
    topk: int = option(2, Integer(1, 2**31 - 1), "k, the bank vectors mixed per sub-vector")
    selection: str = option("topk", Choice(SELECTIONS), "vector selection during training")
    gumbel_tau: float = option(1.0 / 3.0, Number(0.0, open_low=True))
    noise_std: float = option(0.1, Number(0.0))
    # the adapter file: "topk" (indices + k-1 weights) or "logits" (exact resume)
    store: str = option("topk", Choice(("topk", "logits")), "what the adapter file keeps: top-k indices and weights, "
                        "or every logit (exact resume)")
    chosen_from_layout = ("vector_length",)

    def check(self, config):
        if self.topk > self.num_vectors:
            raise UniLoraError(f"topk must be between 1 and num_vectors={self.num_vectors}, got {self.topk}")
        if self.selection == "all" and self.store == "topk":
            raise UniLoraError("selection='all' mixes every bank vector, so top-k indices cannot reproduce it: "
                               "use store='logits'")


def auto_vector_length(layout) -> int:
    """The largest b <= 256 that divides both dimensions of every adapted layer."""
    common = math.gcd(*(n for s in layout.slots for n in (s.in_features, s.out_features)))
    return max(b for b in range(1, min(common, MAX_AUTO_VECTOR_LENGTH) + 1) if common % b == 0)


def check_divisible(layout, b: int) -> None:
    for s in layout.slots:
        if s.in_features % b or s.out_features % b:
            raise UniLoraError(
                f"VB-LoRA vector_length b={b} must divide both dimensions of every adapted layer, but layer "
                f"'{s.name}' is {s.out_features}x{s.in_features}; choose b dividing both (e.g. a common "
                "factor of the hidden sizes) or exclude that layer from target_modules"
            )


def _last_from_rest(weights: torch.Tensor) -> torch.Tensor:
    """Replace the last of the k weights by 1 - Σ(the others), exactly as it is stored, so a
    model and its reloaded copy compute bit-identical sub-vectors."""
    rest = weights[:, :-1]
    return torch.cat([rest, 1.0 - rest.sum(-1, keepdim=True)], dim=-1)


def index_dtype(num_vectors: int) -> torch.dtype:
    return torch.uint8 if num_vectors <= 256 else torch.int16 if num_vectors <= 32768 else torch.int32


@register_method
class VBLoRAProjection(Projection):
    method = "vblora"
    summary = "a shared bank of h vectors; every sub-vector of A and B mixes k of them; the bank and the top-k choices are stored"
    options = VBLoRAOptions
    peft_type = "VBLORA"
    # rates: the best of the sweep (scripts/tune_rates.sh); the next bank rate up, 4e-2, diverged. The
    # recipe's b = 128 divides MiniLM's widths only: elsewhere b is chosen from the model. A distilled
    # classifier trains the logits at 8e-2: on seeds 5-7 it ended closer to the teacher in held-out KL
    # in 6 of 6 runs.
    recipe = Recipe(defaults=dict(rank=4, num_vectors=60, vector_length=128, topk=2),
                    group_lrs={"bank": 2e-2, "logits": 2e-2},
                    paper=dict(rank=4, num_vectors=90, vector_length=256, topk=2),
                    distill_group_lrs={"seq-cls": {"logits": 8e-2}}, model_specific=("vector_length",))
    stored_note = ("training moves every sub-vector's logits over the whole bank; the file keeps the bank and "
                   "each sub-vector's top-k indices and weights")

    def __init__(self, layout, config):
        super().__init__(layout, config)
        b, h = config.vector_length, config.num_vectors
        check_divisible(layout, b)
        self.num_subvectors = layout.D // b
        generator = torch.Generator().manual_seed(config.seed)
        self.bank = nn.Parameter(torch.rand(h, b, generator=generator) * 0.04 - 0.02)
        self.logits = nn.Parameter(torch.randn(self.num_subvectors, h, generator=generator) * 0.01)
        # (indices, weights, logits version) of a selection loaded in top-k form: used as is until
        # the logits train, because rebuilt logits reproduce the weights only to rounding.
        self._loaded_selection: tuple | None = None

    @classmethod
    def resolve_config(cls, config, layout):
        """b, when left to None: the largest b <= 256 dividing every adapted dimension (and said so)."""
        if config.vector_length is not None:
            return config
        b = auto_vector_length(layout)
        note(f"VB-LoRA: vector_length not given; using b={b}, the largest b <= {MAX_AUTO_VECTOR_LENGTH} "
             "dividing every adapted dimension")
        return config.replace(vector_length=b)

    @property
    def theta(self):
        return self.bank

    # --- selection ------------------------------------------------------------------
    def selection_weights(self, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights, indices): weights (n_sub × k) over bank rows `indices`, or, with
        indices None, dense weights (n_sub × h) over the whole bank."""
        cfg, logits = self.config, self.logits
        mode = cfg.selection if training else ("all" if cfg.selection == "all" else "topk")
        if mode == "all":
            return torch.softmax(logits, dim=-1), None
        if mode in ("gumbel", "st_gumbel"):
            return F.gumbel_softmax(logits, tau=cfg.gumbel_tau, hard=mode == "st_gumbel", dim=-1), None
        if not training and self._loaded_selection is not None:
            indices, weights, version = self._loaded_selection
            if version == self.logits._version and indices.device == logits.device:
                return weights.to(logits.dtype), indices
            self._loaded_selection = None
        if mode == "noisy_topk":
            logits = logits + torch.randn_like(logits) * cfg.noise_std
        top_logits, indices = logits.topk(cfg.topk, dim=-1)
        return _last_from_rest(torch.softmax(top_logits, dim=-1)), indices

    def subvectors(self, bank: torch.Tensor) -> torch.Tensor:
        weights, indices = self.selection_weights(self.training)
        if indices is None:
            return weights @ bank
        return torch.einsum("sk,skb->sb", weights, bank[indices])

    def factors_from(self, theta):
        return self.layout.split(self.subvectors(theta).reshape(-1))

    @property
    def stochastic(self) -> bool:
        return self.config.selection in ("noisy_topk", "gumbel", "st_gumbel")

    @classmethod
    def stored_spec(cls, layout, config):
        n_sub, h, k = layout.D // config.vector_length, config.num_vectors, config.topk
        spec = {"vblora.bank": ((h, config.vector_length), "float")}
        if config.store == "logits":
            spec["vblora.logits"] = ((n_sub, h), "float")
        else:
            spec["vblora.topk_indices"] = ((n_sub, k), "index")
            spec["vblora.topk_weights"] = ((n_sub, k - 1), "float")
        return spec

    @classmethod
    def build_bytes(cls, layout, config):
        n_sub = layout.D // config.vector_length
        # logits (+ a rebuilt copy and a softmax), the bank, one reconstruction
        return 12 * n_sub * config.num_vectors + 4 * config.num_vectors * config.vector_length + 16 * layout.D

    @classmethod
    def check_stored_values(cls, tensors, config):
        if "vblora.topk_indices" not in tensors:
            return
        indices, kept = tensors["vblora.topk_indices"], tensors["vblora.topk_weights"].double()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= config.num_vectors):
            raise UniLoraError(
                f"VB-LoRA top-k indices must lie in [0, {config.num_vectors}) (the bank size), found "
                f"{int(indices.min())}..{int(indices.max())}; the adapter file is damaged"
            )
        if indices.shape[1] > 1:
            ordered = indices.long().sort(dim=1).values
            if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                raise UniLoraError("VB-LoRA top-k indices repeat a bank vector within a sub-vector; the adapter file is damaged")
        tolerance = 1e-4
        if kept.numel() and (float(kept.min()) < -tolerance or float(kept.max()) > 1 + tolerance
                             or float(kept.sum(1).max()) > 1 + tolerance):
            raise UniLoraError(
                "VB-LoRA top-k weights must lie in [0, 1] and sum to at most 1 per sub-vector (the last weight is "
                "1 minus their sum); the adapter file is damaged"
            )

    def param_groups(self):
        return {"bank": [self.bank], "logits": [self.logits]}

    # --- storage --------------------------------------------------------------------
    def topk_selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise-free top-k (indices, weights), as stored and as used in eval. With
        selection="all" (which eval uses in full) these are the k largest, for inspection."""
        with torch.no_grad():
            weights, indices = self.selection_weights(training=False)
            if indices is None:
                top_logits, indices = self.logits.topk(self.config.topk, dim=-1)
                weights = _last_from_rest(torch.softmax(top_logits, dim=-1))
            return indices, weights

    def stored_tensors(self, store=None):
        tensors = {"vblora.bank": self.bank.detach()}
        if (store or self.config.store) == "logits":
            tensors["vblora.logits"] = self.logits.detach()
            return tensors
        indices, weights = self.topk_selection()
        tensors["vblora.topk_indices"] = indices.to(index_dtype(self.config.num_vectors))
        # k-1 weights: the last one is 1 - their sum
        tensors["vblora.topk_weights"] = weights[:, :-1].contiguous()
        return tensors

    def stored_param_count(self):
        """h·b + per sub-vector k indices (as float32 fractions: 1/4 for uint8) + k-1 weights."""
        tensors = self.stored_tensors()
        count = self.bank.numel()
        if "vblora.logits" in tensors:
            return count + self.logits.numel()
        idx = tensors["vblora.topk_indices"]
        return count + idx.numel() * idx.element_size() // 4 + tensors["vblora.topk_weights"].numel()

    def load_stored_tensors(self, tensors):
        self._require_tensors(tensors, ["vblora.bank"])
        copy_into(self.bank, tensors["vblora.bank"], "vblora.bank")
        if "vblora.logits" in tensors:
            copy_into(self.logits, tensors["vblora.logits"], "vblora.logits")
            return
        self._require_tensors(tensors, ["vblora.topk_indices", "vblora.topk_weights"])
        indices = tensors["vblora.topk_indices"].long()
        kept = tensors["vblora.topk_weights"].float()
        expected = (self.num_subvectors, self.config.topk)
        if tuple(indices.shape) != expected or tuple(kept.shape) != (expected[0], expected[1] - 1):
            raise UniLoraError(
                f"VB-LoRA top-k tensors have shapes {tuple(indices.shape)}, {tuple(kept.shape)}; "
                f"expected {expected} and {(expected[0], expected[1] - 1)}"
            )
        weights = _last_from_rest(torch.cat([kept, kept[:, :1]], dim=-1))
        top_logits = weights.clamp_min(1e-12).log()
        # Rebuild logits whose top-k softmax is exactly the stored weights; training can resume,
        # but the ranking among unselected vectors (exploration state) is lost.
        floor = top_logits.min() - _REBUILT_LOGIT_MARGIN
        logits = torch.full_like(self.logits, float(floor))
        logits.scatter_(1, indices, top_logits)
        with torch.no_grad():
            self.logits.copy_(logits)
        self._loaded_selection = (indices.to(self.logits.device), weights.to(self.logits.device), self.logits._version)

    # --- PEFT's VBLORA ---------------------------------------------------------------------
    # The bank as `vblora_vector_bank`; each layer's logits as `logits_A` (r × in/b × h) and
    # `logits_B` (out/b × r × h). An adapter stored as top-k gets logits whose top-k softmax is the
    # stored weights (as our loader rebuilds them). PEFT's VB-LoRA has no scaling: other than 1 is refused.
    def peft_state(self, names, save_projection=True):
        s = self.config.scaling
        if s != 1.0:
            raise UniLoraError(f"this VB-LoRA adapter scales its update by {s:g}; PEFT's VB-LoRA has no scaling, "
                               "so it cannot hold it exactly (export it as LoRA with `unilora export` instead)")
        b, h = self.config.vector_length, self.config.num_vectors
        state = {shared_key("vblora_vector_bank"): self.bank.detach().clone()}
        offset = 0
        for name, slot in zip(names, self.layout.slots):
            n_a, n_b = slot.rank * slot.in_features // b, slot.rank * slot.out_features // b
            logits_a = self.logits.detach()[offset: offset + n_a].reshape(slot.rank, slot.in_features // b, h)
            logits_bt = self.logits.detach()[offset + n_a: offset + n_a + n_b].reshape(slot.rank, slot.out_features // b, h)
            state[layer_key(name, "vblora_logits_A")] = logits_a.clone()
            state[layer_key(name, "vblora_logits_B")] = logits_bt.transpose(0, 1).contiguous()
            offset += n_a + n_b
        return state

    def peft_config(self, save_projection=True):
        c = self.config
        return {"num_vectors": c.num_vectors, "vector_length": c.vector_length, "topk": c.topk,
                "save_only_topk_weights": False, "vblora_dropout": 0.0}

    @classmethod
    def from_peft(cls, source):
        """A directory with its full logits (`save_only_topk_weights=False`): an adapter stored as logits."""
        if source.config.get("save_only_topk_weights"):
            raise UniLoraError("this PEFT VB-LoRA adapter keeps only top-k weights; save it with "
                               "save_only_topk_weights=False to convert it")
        r, h, b, k = source.integers("r", "num_vectors", "vector_length", "topk")
        modules = source.modules("vblora_logits_A")
        if source.shape(shared_key("vblora_vector_bank")) != (h, b) or not modules:
            raise UniLoraError(f"'{source.weights}' does not hold a VB-LoRA bank of shape ({h}, {b}) and per-layer "
                               "logits")
        slots = []
        for name in modules:
            shape_a = source.shape(layer_key(name, "vblora_logits_A"))
            shape_b = source.shape(layer_key(name, "vblora_logits_B"))
            if (shape_a is None or shape_b is None or len(shape_a) != 3 or len(shape_b) != 3 or shape_a[0] != r
                    or shape_b[1] != r or shape_a[2] != h or shape_b[2] != h):
                raise UniLoraError(f"'{source.weights}': the logits of '{name}' have shapes {shape_a}, {shape_b}; "
                                   f"expected ({r}, in/{b}, {h}) and (out/{b}, {r}, {h})")
            slots.append(Slot(name, shape_a[1] * b, shape_b[0] * b, r))
        logits = []
        for name in modules:
            logits.append(source.tensor(layer_key(name, "vblora_logits_A")).reshape(-1, h))
            logits.append(source.tensor(layer_key(name, "vblora_logits_B")).transpose(0, 1).reshape(-1, h))
        options = dict(method=cls.method, rank=r, num_vectors=h, vector_length=b, topk=k, store="logits")
        tensors = {"vblora.bank": source.tensor(shared_key("vblora_vector_bank")), "vblora.logits": torch.cat(logits)}
        return PeftReading(slots, options, tensors)
