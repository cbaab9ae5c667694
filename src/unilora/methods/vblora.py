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

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UniLoraError
from ..core.notes import note
from ..core.registry import register_method
from .base import Projection, Recipe, copy_into

# Logits that an adapter saved in top-k form did not keep are rebuilt this far below the
# smallest kept logit: the top-k and their softmax weights are then exactly as saved.
_REBUILT_LOGIT_MARGIN = 10.0


MAX_AUTO_VECTOR_LENGTH = 256


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
        return dataclasses.replace(config, vector_length=b)

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
