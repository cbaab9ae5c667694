"""The data a user names (`--data` and the options that go with it), loaded for a task: the rules
that every command reading data shares, in one place."""

from __future__ import annotations

import dataclasses

from ..core.errors import UniLoraError
from .lm import LMDataset, load_lm_dataset
from .text import TextDataset, load_dataset


@dataclasses.dataclass
class DataSpec:
    """What `--data`, `--test-data`, the column options, the limits and `--metric` say."""

    data: str | None = None  # a built-in set's name or a file (None: the command's default)
    test_data: str | None = None  # a separate test file (None: a seeded split of `data`)
    text_column: str = "text"
    label_column: str = "label"
    train_limit: int | None = None  # a seeded random subset of this size
    test_limit: int | None = None
    metric: str | None = None  # causal LM: the metric scored on generated answers

    def load(self, task: str) -> TextDataset | LMDataset:
        """The data for `task` ("seq-cls" or "causal-lm"), cut to the limits."""
        if task == "causal-lm":
            dataset = load_lm_dataset(self.data, self.text_column, self.test_data, seed=0, metric=self.metric)
        else:
            if self.metric:
                raise UniLoraError("--metric scores generated answers and goes with --task causal-lm")
            dataset = load_dataset(self.data, self.text_column, self.label_column, self.test_data, seed=0)
        return dataset.limited(self.train_limit, self.test_limit, seed=0)
