"""Hugging Face `datasets` as `--data`: a hub id (with a split and a configuration), a folder written by
`save_to_disk` (a Dataset or a DatasetDict), a .parquet or .arrow file, or a Dataset / DatasetDict
object in Python; read through the `datasets` library (imported only when such data is given).

The test split is the set's own `test`, else its `validation`, else a seeded share of the training
split, as for files. Rows become the same examples as a file's rows (the column options, prompt /
completion and messages detection, a ClassLabel's names as the label names), and the same errors
name the split and the row. The source is recorded with the fingerprint `datasets` computes for each
split, so `unilora evaluate` can load it again and say when it changed. A hub id is only fetched
because the user named it; with HF_HUB_OFFLINE set, `datasets` reads its local cache and nothing else.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UniLoraError
from ..core.extras import require

FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
# a hub dataset id: NAME or OWNER/NAME (what is neither a file nor a folder here)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
TEST_SPLITS = ("test", "validation")
# the built-in sets (data/text.py, data/lm.py) by name: never taken for hub ids
BUILTIN_NAMES = ("rotten_tomatoes", "bbc_news", "bbc_headlines", "rotten_tomatoes_instruct")


def _datasets():
    require("datasets", "this data (a hub id, a save_to_disk folder, a .parquet or .arrow file)")
    import datasets

    return datasets


def is_dataset_object(data) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def is_saved_dataset(path: Path) -> bool:
    """A folder `save_to_disk` wrote: a DatasetDict's dataset_dict.json, or a Dataset's state.json."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def is_hf_data(spec) -> bool:
    """Whether `--data` names data for `datasets`: an object, a saved folder, a .parquet / .arrow file,
    or a hub id (a name that is not a path here and has no file suffix)."""
    if is_dataset_object(spec):
        return True
    if not isinstance(spec, str) or not spec or spec in BUILTIN_NAMES:
        return False
    path = Path(spec)
    if path.is_dir():
        return is_saved_dataset(path)
    if path.suffix.lower() in FILE_KINDS:
        return True
    return not path.exists() and not path.suffix and HUB_ID.fullmatch(spec) is not None


@dataclass
class HFSource:
    """What the options say about a `datasets` source."""

    data: object  # a hub id, a folder, a file, or a Dataset / DatasetDict
    split: str = "train"
    config: str | None = None  # a hub dataset's named configuration (--data-config)
    streaming: bool = False

    @property
    def name(self) -> str:
        if isinstance(self.data, str):
            return Path(self.data).stem if Path(self.data).exists() else self.data
        return getattr(self.data, "info", None) and self.data.info.dataset_name or "dataset"

    def describe(self) -> str:
        return f"'{self.data}'" if isinstance(self.data, str) else f"the {type(self.data).__name__} given"


@dataclass
class Splits:
    train: object  # a datasets.Dataset (IterableDataset when streaming)
    test: object | None  # None: the caller holds out a seeded share of train
    test_split: str | None
    record: dict  # how to load it again, recorded in the adapter
    every: dict | None = None  # all splits of a DatasetDict

    def use_test(self, name: str) -> None:
        """Test on split `name` instead (e.g. labelled validation rows where the test split has none)."""
        self.test, self.test_split = self.every[name], name
        self.record["test_split"] = name
        self.record["fingerprint"][name] = getattr(self.test, "_fingerprint", None)


def recorded_path(spec: str | None) -> str | None:
    """What an adapter records of a source: an absolute path where it is a path here, else the name."""
    return str(Path(spec).resolve()) if spec is not None and Path(spec).exists() else spec


def looks_local(data: str) -> bool:
    """A name that can only mean a path here (it starts with '.', '/' or '~', or its folder exists here),
    never a hub id."""
    path = Path(data)
    return data.startswith((".", "/", "~")) or (str(path.parent) not in ("", ".") and path.parent.is_dir())


def nearby(data: str) -> str:
    """" (did you mean ...?)" with the names in the path's folder nearest to it, or "" when none is near."""
    path = Path(data).expanduser()
    if not path.parent.is_dir():
        return ""
    names = [entry.name for entry in path.parent.iterdir()]
    near = [str(Path(data).parent / name) for name in difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)]
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def missing_path(data: str) -> str:
    return f"no such file or folder '{data}'{nearby(data)}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _open(source: HFSource):
    """The source opened by `datasets`, its progress bars off while it reads (they would bury our one
    line), and its own error log too: a damaged file's reason is in our one line already."""
    datasets = _datasets()
    if not isinstance(source.data, str):
        return source.data
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return _load(datasets, source)
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load(datasets, source: HFSource):
    data = source.data
    path = Path(data)
    kind = FILE_KINDS.get(path.suffix.lower())
    try:
        if path.is_dir():
            if source.streaming:
                raise UniLoraError(f"'{data}' is a saved dataset, already on disk: read it without --streaming")
            return datasets.load_from_disk(str(path))
        if kind:
            if not path.is_file():
                raise UniLoraError(f"data file '{path}' does not exist")
            return datasets.load_dataset(kind, data_files={"train": str(path)}, streaming=source.streaming)
        if looks_local(data):
            raise UniLoraError(missing_path(data))
        return datasets.load_dataset(data, name=source.config, streaming=source.streaming)
    except UniLoraError:
        raise
    except Exception as err:  # datasets raises many kinds (not found, offline, bad config, damaged files)
        if path.exists():
            raise UniLoraError(f"cannot read '{data}' with `datasets`: {_first_line(err)}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise UniLoraError(
            f"cannot load dataset '{data}' from the Hugging Face Hub{' (HF_HUB_OFFLINE is set)' if offline else ''}: "
            f"{_first_line(err)}; on a machine that reaches it, `datasets.load_dataset('{data}')"
            f".save_to_disk(FOLDER)` and pass --data FOLDER") from None


def open_splits(source: HFSource) -> Splits:
    """The training split and the test split (the set's own, where it has one) of a source."""
    if source.config is not None and not (isinstance(source.data, str) and not Path(source.data).exists()):
        raise UniLoraError("--data-config names a configuration of a hub dataset; this data is not one")
    data = _open(source)
    record = {"data": recorded_path(source.data) if isinstance(source.data, str) else None, "split": source.split,
              "data_config": source.config}
    datasets = _datasets()
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(data.keys())
        if source.split not in splits:
            raise UniLoraError(f"{source.describe()} has no split '{source.split}'; its splits are {splits}: pass --split")
        test_split = next((s for s in TEST_SPLITS if s in splits and s != source.split), None)
        train, test, every = data[source.split], (data[test_split] if test_split else None), dict(data)
    else:
        if source.split != "train":
            raise UniLoraError(f"{source.describe()} is a single split; --split goes with a dataset of several")
        train, test, test_split, every = data, None, None, None
    record["test_split"] = test_split
    record["fingerprint"] = {name: getattr(ds, "_fingerprint", None)
                             for name, ds in ((source.split, train), (test_split, test)) if ds is not None}
    return Splits(train, test, test_split, record, every)


def given_test_split(test_path: str) -> tuple[HFSource, object, str]:
    """--test-data as a `datasets` source: (source, split, its name), the set's test split if it has one."""
    source = HFSource(test_path)
    splits = open_splits(source)
    if splits.test is not None:
        return source, splits.test, splits.test_split
    return source, splits.train, source.split


def columns_of(split) -> list[str]:
    """A split's columns (a stream may name them only in its rows)."""
    return list(split.column_names or next(iter(split), {}))


def require_columns(source: HFSource, split, columns: list[str], hint: str) -> None:
    present = list(split.column_names or [])
    missing = [c for c in columns if c not in present]
    if missing:
        raise UniLoraError(f"column '{missing[0]}' is not in {source.describe()}; its columns are {present}: {hint}")


def where(source: HFSource, split: str, index: int) -> str:
    """A row's place in errors, as a file's line is: `NAME [split SPLIT] row N`."""
    return f"{source.name} [split {split}] row {index}"


def label_names_of(split, column: str) -> list[str] | None:
    """A ClassLabel column's names (the ids' meaning), else None."""
    feature = (split.features or {}).get(column)
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def changed_since(record: dict, splits: Splits) -> list[str]:
    """Splits whose fingerprint differs from the one recorded at training (the data changed)."""
    now = splits.record.get("fingerprint") or {}
    return [name for name, value in (record.get("fingerprint") or {}).items()
            if value and now.get(name) and now[name] != value]
