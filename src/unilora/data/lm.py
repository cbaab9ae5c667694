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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UniLoraError
from ..core.extras import require
from .hf import (
    HFSource,
    columns_of,
    given_test_split,
    is_hf_data,
    nearby,
    open_splits,
    recorded_path,
    require_columns,
    where,
)
from .tables import TEST_FRACTION, read_rows, read_utf8, row_field, seeded_split
from .text import bbc_news, rotten_tomatoes

ROLES = ("system", "user", "assistant")

# Built-in tasks: the metric each defines.
BUILTIN_LM_TASKS = {"bbc_headlines": "rougeL", "rotten_tomatoes_instruct": "accuracy"}
HEADLINE_PROMPT = "Write the headline of this BBC News article.\n\n{article}"
REVIEW_PROMPT = "Review: {review}\nFresh or rotten? Answer with one word."
ARTICLE_WORDS = 100  # articles are cut to their first words (the lead carries the headline)


STREAM_TEST_ROWS = 512  # a streamed set's test rows when --test-limit does not say
SHUFFLE_BUFFER = 10_000  # rows a stream is shuffled within


@dataclass
class StreamedRows:
    """Training rows read lazily from a streamed `datasets` split (--streaming): `count` rows per
    epoch, shuffled within a buffer in a new order each epoch, checked as they come; never all held."""

    stream: object  # a datasets.IterableDataset
    count: int | None  # None: the stream does not say (then --train-limit must)
    kind: str
    text_column: str
    name: str
    seed: int = 0

    def __len__(self) -> int:
        return self.count or 0

    def limited(self, limit: int | None) -> "StreamedRows":
        if limit is None or (self.count is not None and limit >= self.count):
            return self
        return StreamedRows(self.stream, limit, self.kind, self.text_column, self.name, self.seed)

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[dict]:
        """This epoch's examples for one rank (each rank reads its own share of the stream)."""
        from datasets.distributed import (
            split_dataset_by_node,  # the stream exists, so `datasets` does
        )

        stream = self.stream.shuffle(seed=self.seed * 7919 + epoch, buffer_size=SHUFFLE_BUFFER).take(self.count)
        if world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        for i, row in enumerate(stream):
            yield example_of(f"{self.name} [streamed, epoch {epoch}] row {i}", row, self.kind, self.text_column)


@dataclass
class LMDataset:
    name: str
    kind: str
    train: list[dict] | StreamedRows
    test: list[dict]
    metric: str | None = None  # scored on generations of the test prompts (not for plain text)
    source: dict | None = None  # how to load it again (recorded in adapters)

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> "LMDataset":
        def take(rows, limit, salt):
            if limit is None or limit >= len(rows):
                return rows
            return [rows[i] for i in random.Random(seed * 1000 + salt).sample(range(len(rows)), limit)]

        train = self.train.limited(train_limit) if isinstance(self.train, StreamedRows) else take(self.train,
                                                                                                  train_limit, 1)
        return LMDataset(self.name, self.kind, train, take(self.test, test_limit, 2), self.metric, self.source)


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


def kind_of(row) -> str:
    """The example kind a row's (or a dataset's) fields name."""
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return "text"


def check_messages(where: str, value, need_assistant: bool = True) -> list[dict]:
    """A conversation read from a file or dataset: a non-empty list of {role, content}; `where` names
    the row in errors."""
    if not isinstance(value, list) or not value:
        raise UniLoraError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise UniLoraError(f"{where}: message {i} must be an object with 'role' in {list(ROLES)} "
                               "and text 'content'")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise UniLoraError(f"{where}: the conversation has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def example_of(where: str, row: dict, kind: str, text_column: str) -> dict:
    """One training example of `kind` from a row (a file's or a dataset's)."""
    if kind == "chat":
        return {"messages": check_messages(where, row["messages"])}
    if kind == "prompt_completion":
        return {"prompt": row_field(where, row, "prompt"), "completion": row_field(where, row, "completion")}
    return {"text": row_field(where, row, text_column)}


def read_lm_file(path: Path, text_column: str) -> tuple[str, list[dict]]:
    if not path.is_file():
        raise UniLoraError(f"data file '{path}' does not exist{nearby(str(path))}; pass a .txt/JSONL/CSV file or one of "
                           f"{', '.join(BUILTIN_LM_TASKS)}")
    if path.suffix == ".txt":
        documents = [d.strip() for d in read_utf8(path).split("\n\n") if d.strip()]
        if not documents:
            raise UniLoraError(f"data file '{path}' holds no text")
        return "text", [{"text": d} for d in documents]
    rows = read_rows(path)
    if not rows:
        raise UniLoraError(f"data file '{path}' has no rows")
    kind = kind_of(rows[0][1])
    examples = []
    for line, row in rows:
        if kind_of(row) != kind:
            raise UniLoraError(f"{path}:{line}: this row is {kind_of(row).replace('_', '/')} data but the first row "
                               f"is {kind.replace('_', '/')}; use one shape per file")
        examples.append(example_of(f"{path}:{line}", row, kind, text_column))
    return kind, examples


def _test_examples(test_path: str, text_column: str) -> tuple[str, list[dict]]:
    """(kind, examples) of --test-data: a file, or a `datasets` source (its test split if it has one)."""
    if not is_hf_data(test_path):
        return read_lm_file(Path(test_path), text_column)
    source, split, name = given_test_split(test_path)
    kind = _hf_kind(source, split, text_column)
    return kind, [example_of(where(source, name, i), row, kind, text_column) for i, row in enumerate(split)]


def _hf_kind(source: HFSource, split, text_column: str) -> str:
    """The example kind a split's columns name; the columns that kind reads must be there."""
    kind = kind_of(columns_of(split))
    needed = {"chat": ["messages"], "prompt_completion": ["prompt", "completion"], "text": [text_column]}[kind]
    require_columns(source, split, needed, "pass --text-column, or give prompt/completion or messages columns")
    return kind


def stream_rows(source: HFSource, stream) -> int | None:
    """How many rows a streamed split holds, where that is known without reading it: the hub's split
    metadata, or a local .parquet file's footer."""
    info = getattr(stream, "info", None)
    known = getattr((getattr(info, "splits", None) or {}).get(source.split), "num_examples", None)
    if not known and isinstance(source.data, str) and source.data.lower().endswith(".parquet"):
        import pyarrow.parquet  # what `datasets` reads parquet with

        known = pyarrow.parquet.read_metadata(source.data).num_rows
    return known or None


def hf_lm_dataset(source: HFSource, text_column: str, test_path: str | None, seed: int, test_fraction: float,
                  stream_test_rows: int = STREAM_TEST_ROWS) -> LMDataset:
    """Causal-LM data from `datasets` (data/hf.py); with `source.streaming`, the training rows stay a
    stream (StreamedRows) and the test rows are the first `stream_test_rows` of the test split, or of
    the training split (which then starts after them)."""
    splits = open_splits(source)
    kind = _hf_kind(source, splits.train, text_column)
    test = None
    if test_path is not None:
        test_kind, test = _test_examples(test_path, text_column)
        if test_kind != kind:
            raise UniLoraError(f"the test data holds {test_kind} data and the training data {kind} data")
    if source.streaming:
        known = stream_rows(source, splits.train)
        stream = splits.train
        if test is None:
            held, held_name = (splits.test, splits.test_split) if splits.test is not None else (stream, source.split)
            test = [example_of(where(source, held_name, i), row, kind, text_column)
                    for i, row in enumerate(held.take(stream_test_rows))]
            if splits.test is None:  # the first rows are the test rows: training starts after them
                stream, known = stream.skip(stream_test_rows), known and max(0, known - len(test))
                splits.record["test_split"] = f"the first {len(test)} rows of {source.split}"
        train = StreamedRows(stream, known, kind, text_column, source.name, seed)
    else:
        train = [example_of(where(source, source.split, i), row, kind, text_column)
                 for i, row in enumerate(splits.train)]
        if test is None and splits.test is not None:
            test = [example_of(where(source, splits.test_split, i), row, kind, text_column)
                    for i, row in enumerate(splits.test)]
        elif test is None:
            train, test = seeded_split(train, source.name, seed, test_fraction)
    record = {**splits.record, "text_column": text_column, "test_data": recorded_path(test_path),
              "streaming": source.streaming}
    return LMDataset(source.name, kind, train, test, None, record)


def load_lm_dataset(spec, text_column: str = "text", test_path: str | None = None, seed: int = 0,
                    test_fraction: float = TEST_FRACTION, metric: str | None = None, split: str = "train",
                    data_config: str | None = None, streaming: bool = False,
                    stream_test_rows: int = STREAM_TEST_ROWS) -> LMDataset:
    """Causal-LM data: a built-in task, a .txt / JSONL / JSON / CSV file, or a `datasets` source (a hub
    id, a saved folder, a .parquet / .arrow file, a Dataset or DatasetDict; `streaming` for big ones)."""
    if streaming and not is_hf_data(spec):
        raise UniLoraError("--streaming reads a `datasets` source (a hub id, or a .parquet / .arrow file); this data "
                           "is read whole")
    if spec == "bbc_headlines":
        dataset = bbc_headlines(seed)
    elif spec == "rotten_tomatoes_instruct":
        dataset = rotten_tomatoes_instruct(seed)
    elif is_hf_data(spec):
        dataset = hf_lm_dataset(HFSource(spec, split, data_config, streaming), text_column, test_path, seed,
                                test_fraction, stream_test_rows)
    else:
        path = Path(spec)
        kind, train = read_lm_file(path, text_column)
        if test_path is not None:
            test_kind, test = _test_examples(test_path, text_column)
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
    if dataset.metric == "rougeL":  # known before training: say so now, not after the last epoch
        require("llm", "the rougeL metric", ("rouge_score",))
    return dataset


def is_lm_data(spec, text_column: str = "text", split: str = "train", data_config: str | None = None,
               streaming: bool = False) -> bool:
    """Whether data is for a causal LM: a built-in generative task, a .txt file, or JSON rows (or a
    `datasets` split's columns) with prompt/completion or messages, or with the text field alone. A
    table with other fields (a CSV, or rows whose label column is misnamed) stays classification
    data, whose errors name the missing column."""
    if spec in BUILTIN_LM_TASKS:
        return True
    if is_hf_data(spec):
        columns = columns_of(open_splits(HFSource(spec, split, data_config, streaming)).train)
        return kind_of(columns) != "text" or columns == [text_column]
    path = Path(spec)
    if not path.is_file() or path.suffix not in (".txt", ".jsonl", ".json"):
        return False
    if path.suffix == ".txt":
        return True
    rows = read_rows(path)
    if not rows:
        return False
    first = rows[0][1]
    return kind_of(first) != "text" or set(first) == {text_column}
