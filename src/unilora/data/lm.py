"""Data for causal-LM fine-tuning: plain text, prompt / completion pairs, or chat conversations.

Each example is a dict of one kind:
- {"text": ...}: continued pre-training, loss on every token;
- {"prompt": ..., "completion": ...}: loss on the completion only;
- {"messages": [{"role": ..., "content": ...}, ...]}: rendered with the tokenizer's chat template,
  loss on the assistant turns only.

Sources: a .txt file (documents separated by blank lines), a JSONL / JSON / CSV file whose rows
have one of the shapes above, or a built-in generative task made from the offline data packages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UniLoraError
from .tables import TEST_FRACTION, read_rows, read_utf8, row_field, seeded_split
from .text import bbc_news, rotten_tomatoes

ROLES = ("system", "user", "assistant")

# Built-in tasks: the metric each defines.
BUILTIN_LM_TASKS = {"bbc_headlines": "rougeL", "rotten_tomatoes_instruct": "accuracy"}
HEADLINE_PROMPT = "Write the headline of this BBC News article.\n\n{article}"
REVIEW_PROMPT = "Review: {review}\nFresh or rotten? Answer with one word."
ARTICLE_WORDS = 100  # articles are cut to their first words (the lead carries the headline)


@dataclass
class LMDataset:
    name: str
    kind: str
    train: list[dict]
    test: list[dict]
    metric: str | None = None  # scored on generations of the test prompts (not for plain text)
    source: dict | None = None  # how to load it again (recorded in adapters)

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> "LMDataset":
        def take(rows, limit, salt):
            if limit is None or limit >= len(rows):
                return rows
            return [rows[i] for i in random.Random(seed * 1000 + salt).sample(range(len(rows)), limit)]

        return LMDataset(self.name, self.kind, take(self.train, train_limit, 1), take(self.test, test_limit, 2),
                         self.metric, self.source)


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def bbc_headlines(seed: int = 0) -> LMDataset:
    """BBC News: article (its first ARTICLE_WORDS words) -> headline (the file's first line)."""
    news = bbc_news(seed)

    def rows(texts):
        out = []
        for text in texts:
            headline, _, body = text.partition("\n")
            article = " ".join(body.split()[:ARTICLE_WORDS])
            out.append(_chat(HEADLINE_PROMPT.format(article=article), headline.strip()))
        return out

    return LMDataset("bbc_headlines", "chat", rows(news.train_texts), rows(news.test_texts), "rougeL",
                     {"data": "bbc_headlines"})


def rotten_tomatoes_instruct(seed: int = 0) -> LMDataset:
    """Rotten Tomatoes as instructions: the review and a question -> "fresh" or "rotten" (split by movie)."""
    reviews = rotten_tomatoes(seed)

    def rows(texts, labels):
        return [_chat(REVIEW_PROMPT.format(review=t), reviews.label_names[y]) for t, y in zip(texts, labels)]

    return LMDataset("rotten_tomatoes_instruct", "chat", rows(reviews.train_texts, reviews.train_labels),
                     rows(reviews.test_texts, reviews.test_labels), "accuracy", {"data": "rotten_tomatoes_instruct"})


def _kind_of(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return "text"


def check_messages(path: Path, line: int, value, need_assistant: bool = True) -> list[dict]:
    """A conversation read from a file: a non-empty list of {role, content}."""
    if not isinstance(value, list) or not value:
        raise UniLoraError(f"{path}:{line}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise UniLoraError(f"{path}:{line}: message {i} must be an object with 'role' in {list(ROLES)} "
                               "and text 'content'")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise UniLoraError(f"{path}:{line}: the conversation has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _example(path: Path, line: int, row: dict, kind: str, text_column: str) -> dict:
    if kind == "chat":
        return {"messages": check_messages(path, line, row["messages"])}
    if kind == "prompt_completion":
        return {"prompt": row_field(path, line, row, "prompt"), "completion": row_field(path, line, row, "completion")}
    return {"text": row_field(path, line, row, text_column)}


def _read_examples(path: Path, text_column: str) -> tuple[str, list[dict]]:
    if not path.is_file():
        raise UniLoraError(f"data file '{path}' does not exist; pass a .txt/JSONL/CSV file or one of "
                           f"{', '.join(BUILTIN_LM_TASKS)}")
    if path.suffix == ".txt":
        documents = [d.strip() for d in read_utf8(path).split("\n\n") if d.strip()]
        if not documents:
            raise UniLoraError(f"data file '{path}' holds no text")
        return "text", [{"text": d} for d in documents]
    rows = read_rows(path)
    if not rows:
        raise UniLoraError(f"data file '{path}' has no rows")
    kind = _kind_of(rows[0][1])
    examples = []
    for line, row in rows:
        if _kind_of(row) != kind:
            raise UniLoraError(f"{path}:{line}: this row is {_kind_of(row).replace('_', '/')} data but the first row "
                               f"is {kind.replace('_', '/')}; use one shape per file")
        examples.append(_example(path, line, row, kind, text_column))
    return kind, examples


def load_lm_dataset(spec: str, text_column: str = "text", test_path: str | None = None, seed: int = 0,
                    test_fraction: float = TEST_FRACTION, metric: str | None = None) -> LMDataset:
    if spec == "bbc_headlines":
        dataset = bbc_headlines(seed)
    elif spec == "rotten_tomatoes_instruct":
        dataset = rotten_tomatoes_instruct(seed)
    else:
        path = Path(spec)
        kind, train = _read_examples(path, text_column)
        if test_path is not None:
            test_kind, test = _read_examples(Path(test_path), text_column)
            if test_kind != kind:
                raise UniLoraError(f"the test file holds {test_kind} data and the training file {kind} data")
        else:
            train, test = seeded_split(train, path, seed, test_fraction)
        source = {"data": str(path.resolve()), "text_column": text_column,
                  "test_data": str(Path(test_path).resolve()) if test_path is not None else None}
        dataset = LMDataset(path.stem, kind, train, test, None, source)
    if metric is not None:
        if dataset.kind == "text":
            raise UniLoraError(f"--metric {metric} scores generated answers; plain-text data has no answers "
                               "(use prompt/completion or chat data)")
        dataset.metric = metric
    return dataset


def is_lm_data(spec: str, text_column: str = "text") -> bool:
    """Whether data is for a causal LM: a built-in generative task, a .txt file, or JSON rows with
    prompt/completion or messages, or with the text field alone. A table with other fields (a CSV,
    or rows whose label column is misnamed) stays classification data, whose errors name the
    missing column."""
    if spec in BUILTIN_LM_TASKS:
        return True
    path = Path(spec)
    if not path.is_file() or path.suffix not in (".txt", ".jsonl", ".json"):
        return False
    if path.suffix == ".txt":
        return True
    rows = read_rows(path)
    if not rows:
        return False
    first = rows[0][1]
    return _kind_of(first) != "text" or set(first) == {text_column}
