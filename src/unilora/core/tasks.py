"""The task vocabulary an adapter records: the kind of task it was trained for, the kind of data a
causal LM learned from, and the metrics scored on its generated answers. Kept here, below both the
file format (store/) and the data readers (data/), so that each speaks it without knowing the other."""

from __future__ import annotations

TASK_KINDS = ("seq-cls", "causal-lm")  # a classifier (an encoder and a head), a causal LM
LM_DATA_KINDS = ("text", "prompt_completion", "chat")
METRICS = ("rougeL", "accuracy", "exact_match")


def task_kind(record: dict) -> str:
    """The task kind an adapter records (adapters from before causal-LM tasks are classifiers)."""
    return record.get("task", "seq-cls")
