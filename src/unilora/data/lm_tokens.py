"""Causal-LM data as token ids: the three data kinds (text, prompt / completion, chat) with their loss
masks, right-padded batches, and a prompt's ids the way generation and the server read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import UniLoraError
from ..core.notes import note

IGNORE = -100  # label of a token that carries no loss (prompt, user turns, padding)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UniLoraError("chat data needs a tokenizer with a chat template, and this model's has none; "
                           "use prompt/completion data instead")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    """The rendered conversation; loss on the assistant turns (their closing token included)."""
    ids = token_ids(tokenizer, _chat_text(tokenizer, messages), False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = token_ids(tokenizer, _chat_text(tokenizer, messages[:i], add_generation_prompt=True), False)
        end = token_ids(tokenizer, _chat_text(tokenizer, messages[: i + 1]), False)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise UniLoraError("this tokenizer's chat template does not render a conversation as the sum of its "
                               "turns, so the assistant tokens cannot be found; use prompt/completion data")
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return Encoded(ids, labels)


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> Encoded:
    prompt_ids = token_ids(tokenizer, prompt, True)
    answer = token_ids(tokenizer, completion, False) + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


def encode_texts(tokenizer, texts: list[str], max_length: int, packing: bool,
                 first_block_only: bool = False) -> list[Encoded]:
    """Documents (each closed by EOS) cut into blocks of max_length; packed: one stream;
    `first_block_only`: each document's first block (one example per document)."""
    documents = [token_ids(tokenizer, t, True) + [tokenizer.eos_token_id] for t in texts]
    streams = [[t for d in documents for t in d]] if packing else documents
    blocks = [s[i : i + max_length] for s in streams
              for i in range(0, min(len(s), max_length) if first_block_only else len(s), max_length)]
    return [Encoded(b, b) for b in blocks if len(b) >= 2]  # a lone token predicts nothing


def encode_examples(tokenizer, dataset_kind: str, rows: list[dict], max_length: int, packing: bool,
                    streamed: bool = False) -> list[Encoded]:
    """Token ids and labels of rows; `streamed`: a batch of a stream's rows, one example per row (a text's
    first block), its cuts not noted batch by batch."""
    if dataset_kind == "text":
        return encode_texts(tokenizer, [r["text"] for r in rows], max_length, packing, first_block_only=streamed)
    encoded, cut = [], 0
    for row in rows:
        e = (encode_chat(tokenizer, row["messages"]) if dataset_kind == "chat"
             else encode_prompt_completion(tokenizer, row["prompt"], row["completion"]))
        if len(e.input_ids) > max_length:  # keep the answer and what leads into it
            e, cut = Encoded(e.input_ids[-max_length:], e.labels[-max_length:]), cut + 1
        encoded.append(e)
    if cut and not streamed:
        note(f"{cut} of {len(rows)} examples are longer than --max-length {max_length}; their beginnings were cut")
    return encoded


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (positions need no adjusting); padding carries no loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_and_answer(row: dict) -> tuple[str | list[dict], str]:
    """(prompt, reference answer) of a prompt/completion or chat example: a conversation is cut
    before its last assistant turn."""
    if "prompt" in row:
        return row["prompt"], row["completion"]
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def prompt_ids(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt: a conversation, or a text sent as a user turn when `chat`, goes through
    the chat template (which holds its own special tokens); else the text as the tokenizer encodes it."""
    if isinstance(prompt, list) or chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return token_ids(tokenizer, _chat_text(tokenizer, messages, add_generation_prompt=True), False)
    return token_ids(tokenizer, prompt, True)
