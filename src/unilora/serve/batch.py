"""The rows decoding together, and the forwards that move them: prefill (whole prompts, or one chunk
of a long prompt) and one decode step.

Iteration-level scheduling needs a batch that rows join and leave between steps. The rows share
one key/value cache, left-padded to one length: a row that joins is prefilled on its own forward,
then its cache is padded on the left and stacked under the others'; a row that finishes is cut
out, and columns that only padding still uses are dropped. Padding is masked in attention and
positions count real tokens only, so each row computes what it would alone.

A prompt too long for one turn's token budget is prefilled in chunks (`PromptInProgress`): each
chunk runs on the prompt's own cache, at its true positions, attending to every earlier token, so
the last chunk ends in the cache and logits a one-shot prefill gives; then the row joins the batch.

This holds for caches made only of plain (full-attention) layers; `check_model` refuses others
at start-up rather than serving them wrongly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..core.errors import UniLoraError
from ..engine.generation import left_padded
from ..engine.routing import BASE
from .sequence import Sequence


def check_model(model) -> None:
    """Refuse a causal LM whose cache has other than full-attention layers (sliding windows,
    recurrent state): cutting and stacking rows is only defined for plain layers here."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # an unusual config: the probe below decides
        layers = []
    if any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise UniLoraError(f"{type(model).__name__} keeps a cache of {kinds} layers; the server batches only models "
                           "whose every layer attends in full (Llama, Qwen2, GPT-2, ...)")


def cache_argument(model) -> str:
    """The forward's name for the cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output) -> DynamicCache:
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[-2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:-2], missing, t.shape[-1])), t], dim=-2)


@dataclass(eq=False)
class PromptInProgress:
    """An admitted sequence whose prompt is not yet all in a cache: its row (the adapter it runs) and,
    once its first chunk ran, its own cache of the first `done` prompt tokens."""

    sequence: Sequence
    row: str
    cache: DynamicCache | None = None
    done: int = 0

    @property
    def left(self) -> int:
        return len(self.sequence.prompt_ids) - self.done


class RunningBatch:
    def __init__(self, pad_id: int, cache_argument: str = "cache", device: torch.device | str = "cpu"):
        self.pad_id = pad_id
        self.cache_argument = cache_argument
        self.device = torch.device(device)
        self.sequences: list[Sequence] = []
        self.rows: list[str] = []  # the adapter each row runs (BASE for the base model)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length), 1 on real tokens

    def __len__(self) -> int:
        return len(self.sequences)

    # --- forwards --------------------------------------------------------------------------
    def prefill(self, model, sequences: list[Sequence], rows: list[str], keep_logits: bool) -> torch.Tensor:
        """Run the prompts of new rows (left-padded, one forward) and stack them under the batch;
        returns their last-position logits."""
        padded = left_padded([seq.prompt_ids for seq in sequences], self.pad_id)
        ids, mask = padded["input_ids"].to(self.device), padded["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        extra = {"logits_to_keep": 1} if keep_logits else {}
        extra[self.cache_argument] = DynamicCache()
        out = _forward(model, rows, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        self._join(sequences, rows, _cache_of(out), mask)
        return out.logits[:, -1].float().cpu()

    def prefill_chunk(self, model, prompt: PromptInProgress, n: int, keep_logits: bool) -> torch.Tensor | None:
        """Run the next `n` tokens of a prompt on its own cache. After its last chunk the row joins the
        batch and its last-position logits are returned; before, None."""
        end = prompt.done + n
        ids = torch.tensor([prompt.sequence.prompt_ids[prompt.done:end]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(prompt.done, end, device=self.device).unsqueeze(0)
        extra = {"logits_to_keep": 1} if keep_logits else {}
        extra[self.cache_argument] = prompt.cache if prompt.cache is not None else DynamicCache()
        out = _forward(model, [prompt.row], input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, **extra)
        prompt.cache, prompt.done = _cache_of(out), end
        if prompt.left:
            return None
        self._join([prompt.sequence], [prompt.row], prompt.cache, mask)
        prompt.cache = None
        return out.logits[:, -1].float().cpu()

    def step(self, model) -> torch.Tensor:
        """One decode step for every row: the last token in, next-token logits out."""
        last = torch.tensor([[s.generated[-1]] for s in self.sequences], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        out = _forward(model, self.rows, input_ids=last, attention_mask=self.mask, position_ids=positions,
                       use_cache=True, **{self.cache_argument: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1].float().cpu()

    # --- rows joining and leaving ------------------------------------------------------------
    def _join(self, sequences: list[Sequence], rows: list[str], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.sequences, self.rows, self.cache, self.mask = list(sequences), list(rows), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        joined = [tuple(torch.cat([_pad_left(a, length), _pad_left(b, length)], dim=0) for a, b in zip(old, new))
                  for old, new in zip(_layers(self.cache), _layers(cache))]
        self.cache = DynamicCache(ddp_cache_data=joined)
        self.mask = torch.cat([_pad_left(self.mask.unsqueeze(-1), length).squeeze(-1),
                               _pad_left(mask.unsqueeze(-1), length).squeeze(-1)], dim=0)
        self.sequences += sequences
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices`, and drop the cache columns none of them uses."""
        if len(indices) == len(self):
            return
        if not indices:
            self.sequences, self.rows, self.cache, self.mask = [], [], None, None
            return
        index = torch.tensor(indices, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])
        self.cache = DynamicCache(ddp_cache_data=[(k.index_select(0, index)[..., first:, :],
                                                   v.index_select(0, index)[..., first:, :])
                                                  for k, v in _layers(self.cache)])
        self.mask = mask[:, first:]
        self.sequences = [self.sequences[i] for i in indices]
        self.rows = [self.rows[i] for i in indices]


def _forward(model, rows: list[str], **inputs):
    """A forward of `model` (an AdaptedModel running `rows`, or the plain base model while no
    adapter is resident)."""
    if hasattr(model, "mixed_rows"):
        return model(adapter_names=rows, **inputs)
    if any(r != BASE for r in rows):
        raise UniLoraError("an adapter row reached a model without adapters")  # a bug of ours
    return model(**inputs)
