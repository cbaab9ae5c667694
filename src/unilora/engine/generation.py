"""Greedy generation in batches, as evaluation and `unilora generate` use it (the server has its own
scheduler, serve/scheduler.py)."""

from __future__ import annotations

import torch


class Generation(str):
    """A generated text (special tokens removed, stripped) that also says how many tokens the model
    produced before it ended: an empty text from 0 tokens is a model that stopped at once."""

    new_tokens: int

    def __new__(cls, text: str, new_tokens: int) -> "Generation":
        made = super().__new__(cls, text)
        made.new_tokens = new_tokens
        return made


def _tokens_before_end(row: list[int], ends: set[int]) -> int:
    return next((i for i, token in enumerate(row) if token in ends), len(row))


def left_padded(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of token lists padded on the left, as generation reads them."""
    width = max(len(ids) for ids in batch)
    return {"input_ids": torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch],
                                           dtype=torch.long)}


@torch.no_grad()
def generate(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, batch_size: int,
             max_prompt_tokens: int | None = None) -> list[Generation]:
    """Greedy continuations of each prompt (token ids; batched, left-padded), special tokens removed."""
    model.eval()
    if max_prompt_tokens:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[Generation] = [Generation("", 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = left_padded([encoded[i] for i in idx], tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}
        for row, i in enumerate(idx):
            tokens = new[row, width:].tolist()
            outputs[i] = Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                    _tokens_before_end(tokens, ends - {None}))
    return outputs
