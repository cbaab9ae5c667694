"""Causal-LM fine-tuning (`--task causal-lm`): the loss and eval loss / perplexity, the metrics
scored on generated answers, and the task. Tokenizing lives in data/lm_tokens.py, batched greedy
generation in engine/generation.py."""

from __future__ import annotations

import inspect
import itertools
import math
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import UniLoraError
from ..core.extras import require
from ..core.tasks import task_kind
from ..data.lm import (
    BUILTIN_LM_TASKS,
    LMDataset,
    StreamedRows,
    check_messages,
    load_lm_dataset,
)
from ..data.lm_tokens import (
    IGNORE,
    Encoded,
    collate,
    encode_examples,
    prompt_and_answer,
    prompt_ids,
    token_ids,
)
from ..data.tables import read_rows
from ..engine.generation import generate, left_padded
from ..engine.model import AdaptedModel
from ..models.adapter_base import peft_task_type
from ..core.notes import note
from ..models.backbones import load_causal_lm
from ..models.quantization import check_quantization, quantization_note, quantization_of, quantize_model
from ..store.io import read_adapter
from .loop import Task, TrainSettings, distributed, fitted_max_length
from .records import hf_options, note_changes, recorded_data


def accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def target_logits(model, batch: dict, keep_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the token each position predicts: IGNORE where none). With `keep_logits`, logits
    are computed only at positions that predict a target (`logits_to_keep`): the vocabulary
    projection is about a fifth of a small LM's compute, and most positions of an instruction
    example carry no loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
    if keep_logits:
        keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
        return model(**inputs, logits_to_keep=keep).logits, targets[:, keep]
    return model(**inputs).logits, targets


def token_loss(model, batch: dict, reduction: str = "mean", keep_logits: bool = True) -> torch.Tensor:
    """Cross-entropy of each target token given the tokens before it."""
    logits, targets = target_logits(model, batch, keep_logits)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def token_loss_and_hits(model, batch: dict, keep_logits: bool = True) -> tuple[float, int, int]:
    """(the targets' summed cross-entropy, how many targets are the most likely token, how many
    targets): a validation's loss and mean token accuracy, added over batches."""
    logits, targets = target_logits(model, batch, keep_logits)
    scored = targets != IGNORE
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    hits = (logits.argmax(-1) == targets) & scored
    return loss.item(), int(hits.sum()), int(scored.sum())


def batches_by_length(examples: list[Encoded], pad_id: int, batch_size: int) -> list[tuple[list[int], dict]]:
    """(indices, batch) of `examples` in batches of similar length (little padding), shortest first."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [(order[s : s + batch_size], collate([examples[i] for i in order[s : s + batch_size]], pad_id))
            for s in range(0, len(order), batch_size)]


@torch.no_grad()
def eval_loss(model, examples: list[Encoded], pad_id: int, batch_size: int, keep_logits: bool = True) -> float:
    """Mean loss per target token over all examples (not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    for _, batch in batches_by_length(examples, pad_id, batch_size):
        total += token_loss(model, batch, "sum", keep_logits).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(1, count)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _normal(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def score(metric: str, generations: list[str], references: list[str]) -> float:
    """rougeL: mean ROUGE-L F1 x 100 (rouge-score, stemmed); accuracy: share of answers whose first
    word is the reference's (case and punctuation ignored); exact_match: whole answers equal so."""
    if metric == "rougeL":
        require("llm", "the rougeL metric", ("rouge_score",))
        from rouge_score import (
            rouge_scorer,  # deferred: the optional `llm` extra, for this metric only
        )

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        values = [scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generations, references)]
        return 100.0 * sum(values) / max(1, len(values))
    if metric == "accuracy":
        first = [(_normal(g).split() or [""])[0] for g in generations]
        hits = [f == (_normal(r).split() or [""])[0] for f, r in zip(first, references)]
    elif metric == "exact_match":
        hits = [_normal(g) == _normal(r) for g, r in zip(generations, references)]
    else:
        raise UniLoraError(f"unknown metric '{metric}'")
    return sum(hits) / max(1, len(hits))


def answer_budget(tokenizer, answers: list[str]) -> int:
    """Tokens to generate per answer: the longest reference plus room for the closing token."""
    return max(len(token_ids(tokenizer, a, False)) for a in answers) + 4


def score_generations(model, tokenizer, dataset: LMDataset, max_length: int, batch_size: int,
                      max_new_tokens: int | None) -> dict:
    pairs = [prompt_and_answer(row) for row in dataset.test]
    answers = [a for _, a in pairs]
    encoded = [prompt_ids(tokenizer, p, chat=False) for p, _ in pairs]
    budget = max_new_tokens or answer_budget(tokenizer, answers)
    generations = generate(model, tokenizer, encoded, budget, batch_size, max(1, max_length - budget))
    return {dataset.metric: score(dataset.metric, generations, answers),
            "samples": [{"reference": a, "generation": g} for a, g in list(zip(answers, generations))[:3]]}


class CausalLMTask(Task):
    kind = "causal-lm"
    needs_test_split = True  # a run scores its test split; a served job without a validation file has none

    def build(self, model_name: str, settings: TrainSettings) -> torch.nn.Module:
        tokenizer, lm = load_causal_lm(model_name)
        if settings.quantize:
            quantize_model(lm, settings.quantize)
        self.prepare(tokenizer, lm, settings)
        return lm

    def prepare(self, tokenizer, lm, settings: TrainSettings) -> None:
        """Encode the data for `lm` (what `build` does once the model is loaded). Streamed training rows
        (--streaming) are encoded batch by batch as they come, one example of up to max_length tokens
        per row (no packing: the rows are not all there to pack)."""
        self.tokenizer = tokenizer
        self.max_length = fitted_max_length(settings.max_length, self.tokenizer, lm)
        kind, packing = self.dataset.kind, settings.packing
        self.stream = self.dataset.train if isinstance(self.dataset.train, StreamedRows) else None
        if self.stream is not None:
            settings.packing, settings.group_by_length, packing = False, False, False
            self.train_examples = range(len(self.stream))  # rows by position; `batch` reads them from the stream
        else:
            self.train_examples = encode_examples(self.tokenizer, kind, self.dataset.train, self.max_length, packing)
        self.test_examples = encode_examples(self.tokenizer, kind, self.dataset.test, self.max_length, packing)
        if not self.train_examples or (self.needs_test_split and not self.test_examples):
            raise UniLoraError(f"the {'training' if not self.train_examples else 'test'} split of '{self.data_name}' "
                               "holds no token to learn or score; give it more text")
        self.settings = settings  # its batch size is chosen after the data is encoded (plan.plan_run)
        self.no_grad_batch_size: int | None = None
        self.keep_logits = accepts_logits_to_keep(lm)

    def start_epoch(self, epoch: int) -> None:
        if self.stream is not None:
            self.rows = self.stream.epoch(epoch, *distributed())

    def batch(self, indices: list[int]) -> dict:
        if self.stream is None:
            return collate([self.train_examples[i] for i in indices], self.tokenizer.pad_token_id)
        rows = list(itertools.islice(self.rows, len(indices)))
        if not rows:
            raise UniLoraError(f"the stream of '{self.data_name}' ended before the {len(self.stream):,} rows this run "
                               "planned; give --train-limit at most the rows it holds")
        examples = encode_examples(self.tokenizer, self.dataset.kind, rows, self.max_length, packing=False,
                                   streamed=True)
        return collate(examples, self.tokenizer.pad_token_id)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return token_loss(model, batch, keep_logits=self.keep_logits)

    def loss_terms(self, indices: list[int]) -> int:
        """Target tokens (the loss is their mean): labels after the first position not ignored."""
        return sum(sum(label != IGNORE for label in self.train_examples[i].labels[1:]) for i in indices)

    def eval_batch_size(self) -> int:
        """Batch size of the passes without gradients: the training one unless set (`no_grad_batch_size`)."""
        return self.no_grad_batch_size or self.settings.batch_size

    def evaluate(self, model, final: bool) -> dict:
        batch_size = self.eval_batch_size()
        loss = eval_loss(model, self.test_examples, self.tokenizer.pad_token_id, batch_size, self.keep_logits)
        result = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if final and self.dataset.metric:
            result.update(score_generations(model, self.tokenizer, self.dataset, self.max_length,
                                            batch_size, self.settings.max_new_tokens))
        return result

    def summary(self, result: dict) -> str:
        text = f"eval loss {result['eval_loss']:.4f} (perplexity {result['perplexity']:.2f})"
        metric = self.dataset.metric
        return text + (f", {metric} {result[metric]:.4f}" if metric in result else "")

    def record(self) -> dict:
        record = {"max_length": self.max_length, "data": self.dataset.source, "kind": self.dataset.kind,
                  "metric": self.dataset.metric}
        if self.settings.quantize:
            record["quantize"] = self.settings.quantize
        return record


def lm_dataset_of(task: dict, adapter_dir) -> LMDataset:
    """The data a causal-LM adapter was trained on, as recorded by `finetune`."""
    spec, source = recorded_data(task, adapter_dir, BUILTIN_LM_TASKS)
    dataset = load_lm_dataset(spec, source.get("text_column", "text"), source.get("test_data"), seed=0,
                              metric=task.get("metric"), streaming=bool(source.get("streaming")), **hf_options(source))
    note_changes(source, dataset)
    return dataset


def load_lm_adapter(adapter, model_name: str | None = None, quantize: str | None = None):
    """(tokenizer, adapted model) of a read causal-LM adapter on its recorded base model, quantized as
    it was trained unless `quantize` says otherwise ("none": not quantized); a difference is noted."""
    task = adapter.task or {}
    tokenizer, lm = load_causal_lm(model_name or task.get("model") or adapter.meta["base_model"]["name_or_path"])
    recorded = task.get("quantize")
    used = recorded if quantize is None else check_quantization(quantize)
    if used:
        quantize_model(lm, used)
    said = quantization_note(recorded, used)
    if said:
        note(said)
    return tokenizer, AdaptedModel.from_pretrained(lm, adapter)


def evaluate_lm_adapter(adapter, dataset: LMDataset | None, model_name: str | None, batch_size: int,
                        limits: tuple[int | None, int | None], max_new_tokens: int | None,
                        quantize: str | None = None) -> dict:
    task = adapter.task
    if dataset is None:
        dataset = lm_dataset_of(task, adapter.path).limited(*limits, seed=0)
    if not isinstance(dataset, LMDataset):
        raise UniLoraError(f"'{adapter.path}' is a causal-LM adapter; evaluate it on text, prompt/completion "
                           "or chat data")
    tokenizer, model = load_lm_adapter(adapter, model_name, quantize)
    max_length = fitted_max_length(task["max_length"], tokenizer, model)
    examples = encode_examples(tokenizer, dataset.kind, dataset.test, max_length, packing=True)
    if not examples:
        raise UniLoraError(f"the test split of '{dataset.name}' holds no token to score; give it more text")
    loss = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, accepts_logits_to_keep(model))
    result = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "test_examples": len(examples),
              "dataset": dataset.name, "method": adapter.config.method}
    if dataset.metric:
        result.update(score_generations(model, tokenizer, dataset, max_length, batch_size, max_new_tokens))
    return {**result, "notes": []}


def prompts_from_file(path: str | Path) -> list:
    """Prompts to generate from: JSONL rows with "prompt" (text) or "messages" (a conversation)."""
    path = Path(path)
    if not path.is_file():
        raise UniLoraError(f"prompts file '{path}' does not exist")
    prompts = []
    for line, row in read_rows(path):
        if row.get("messages") is not None:
            prompts.append(check_messages(f"{path}:{line}", row["messages"], need_assistant=False))
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompts.append(row["prompt"])
        else:
            raise UniLoraError(f"{path}:{line}: expected a 'prompt' text or a 'messages' list")
    if not prompts:
        raise UniLoraError(f"prompts file '{path}' has no rows")
    return prompts


def generate_from_adapter(adapter_dir, prompts: list, max_new_tokens: int, merge: bool = False,
                          model_name: str | None = None, batch_size: int = 8, quantize: str | None = None,
                          merge_to: str | None = None) -> list[str]:
    """Generations of a saved causal-LM adapter, on the base model it records (or `model_name`). A text
    prompt is sent as a user turn through the chat template when the adapter learned from chat data; a
    conversation always is. An adapter saved with save_pretrained records no data: its text prompts
    are encoded as the tokenizer does by default, as the server's /v1/completions does. `merge` merges
    the adapter first (see AdaptedModel.merge); `merge_to` ("float32", "bfloat16") runs the merged model
    in that dtype with every layer in full precision (merge_and_unload(to=...))."""
    adapter, tokenizer, model = open_lm_adapter(adapter_dir, model_name, quantize, "generate")
    chat = (adapter.task or {}).get("kind") == "chat"
    encoded = [prompt_ids(tokenizer, p, chat) for p in prompts]
    if merge_to:  # every layer in full precision, the model in that dtype: what `export --to merged` writes
        model = model.merge_and_unload(to=merge_to)
    elif merge:
        # on a quantized base the merge quantizes W + s·B A again: say what that changed, on these prompts
        check = left_padded(encoded[:batch_size], tokenizer.pad_token_id) if quantization_of(model) else None
        report = model.merge(check=check)
        if report is not None:
            note(report.line().replace("on this batch", "on the first prompts") +
                 "; --merge-to float32 merges without quantizing again")
    return generate(model, tokenizer, encoded, max_new_tokens, batch_size)


def open_lm_adapter(adapter_dir, model_name: str | None = None, quantize: str | None = None, command: str = "generate"):
    """(read adapter, tokenizer, adapted model) of a causal-LM adapter, on the base model it records (or
    `model_name`), quantized as it was trained unless `quantize` says otherwise. An adapter saved with
    save_pretrained records no task: its recorded base model is used."""
    adapter = read_adapter(adapter_dir)
    task = adapter.task or {}
    if (task and task_kind(task) != "causal-lm") or (not task and peft_task_type(adapter.meta) not in (None, "CAUSAL_LM")):
        raise UniLoraError(f"'{adapter_dir}' is a classifier; `{command}` needs a causal-LM adapter")
    name = model_name or task.get("model") or (adapter.meta.get("base_model") or {}).get("name_or_path")
    if not name:
        raise UniLoraError(f"'{adapter_dir}' records no base model; pass --model NAME_OR_PATH")
    return (adapter, *load_lm_adapter(adapter, name, quantize))
