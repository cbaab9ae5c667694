"""The data a user names (`--data` and the options that go with it), loaded for a task: the rules
that every command reading data shares, in one place."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.errors import UniLoraError
from .lm import STREAM_TEST_ROWS, LMDataset, StreamedRows, load_lm_dataset
from .text import TextDataset, load_dataset


@dataclasses.dataclass
class DataSpec:
    """What `--data`, `--test-data`, the column options, the limits and `--metric` say."""

    # a built-in set's name, a file, or a `datasets` source: a hub id, a save_to_disk folder, a .parquet /
    # .arrow file, or a Dataset / DatasetDict object (None: the command's default)
    data: object = None
    test_data: str | None = None  # a separate test file or `datasets` source (None: the set's own test split)
    text_column: str = "text"
    label_column: str = "label"
    train_limit: int | None = None  # a seeded random subset of this size
    test_limit: int | None = None
    metric: str | None = None  # causal LM: the metric scored on generated answers
    split: str = "train"  # a `datasets` source's training split
    data_config: str | None = None  # a hub dataset's named configuration
    streaming: bool = False  # read a `datasets` source as a stream (causal-LM data larger than memory)

    @property
    def name(self) -> str:
        """A short name of the data, for default run folders."""
        if self.data is None or isinstance(self.data, str):
            return Path(self.data or "rotten_tomatoes").stem.replace("/", "-")
        return getattr(getattr(self.data, "info", None), "dataset_name", None) or "dataset"

    def load(self, task: str) -> TextDataset | LMDataset:
        """The data for `task` ("seq-cls" or "causal-lm"), cut to the limits."""
        hf = dict(split=self.split, data_config=self.data_config, streaming=self.streaming)
        if task == "causal-lm":
            dataset = load_lm_dataset(self.data, self.text_column, self.test_data, seed=0, metric=self.metric,
                                      stream_test_rows=self.test_limit or STREAM_TEST_ROWS, **hf)
        else:
            if self.metric:
                raise UniLoraError("--metric scores generated answers and goes with --task causal-lm")
            dataset = load_dataset(self.data, self.text_column, self.label_column, self.test_data, seed=0, **hf)
        dataset = dataset.limited(self.train_limit, self.test_limit, seed=0)
        if isinstance(getattr(dataset, "train", None), StreamedRows) and dataset.train.count is None:
            raise UniLoraError(f"the stream of '{dataset.name}' does not say how many rows it holds: give --train-limit N "
                               "(the rows to train on per epoch)")
        return dataset
