"""What an adapter remembers of the run that made it (its task record: the task kind, the model, the
data and how to read it again), so that `evaluate`, `generate` and `compress` need no options."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UniLoraError
from ..store.io import AdapterFile, read_adapter


def read_task_adapter(adapter: str | Path | AdapterFile) -> tuple[AdapterFile, dict]:
    """The adapter (read and validated unless it already is) and its recorded task; refuses
    adapters not saved by `finetune`."""
    if not isinstance(adapter, AdapterFile):
        adapter = read_adapter(adapter)
    if not adapter.task:
        raise UniLoraError(f"'{adapter.path}' was not saved by `unilora finetune` (no task info); use it from Python")
    return adapter, adapter.task


def recorded_data(task: dict, adapter_dir, builtins) -> tuple[str, dict]:
    """(data spec, source record) of the data `finetune` recorded, if it is available here."""
    source = task.get("data") or {}
    spec = source.get("data")
    if not spec or (spec not in builtins and not Path(spec).is_file()):
        raise UniLoraError(f"'{adapter_dir}' does not record data that is available here"
                           f"{f' ({spec})' if spec else ''}; pass --data")
    return spec, source
