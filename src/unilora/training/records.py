"""What an adapter remembers of the run that made it (its task record: the task kind, the model, the
data and how to read it again), so that `evaluate`, `generate` and `compress` need no options."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UniLoraError
from ..core.notes import note
from ..data.hf import is_hf_data
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
    """(data spec, source record) of the data `finetune` recorded, if it is available here: a built-in
    set, a file, or a `datasets` source (a saved folder, a file, a hub id)."""
    source = task.get("data") or {}
    spec = source.get("data")
    if not spec or (spec not in builtins and not Path(spec).is_file() and not is_hf_data(spec)):
        what = f" ({spec})" if spec else (" (a dataset given in Python)" if "fingerprint" in source else "")
        raise UniLoraError(f"'{adapter_dir}' does not record data that is available here{what}; pass --data")
    return spec, source


def hf_options(source: dict) -> dict:
    """The `datasets` options a source record keeps (split, configuration), for loading it again."""
    return {key: source[key] for key in ("split", "data_config") if source.get(key) is not None}


def note_changes(source: dict, dataset) -> None:
    """Say when a `datasets` source's fingerprint differs from the one recorded at training."""
    then, now = source.get("fingerprint") or {}, (dataset.source or {}).get("fingerprint") or {}
    changed = sorted(split for split, value in then.items() if value and now.get(split) not in (None, value))
    if changed:
        note(f"the data changed since this adapter was trained: the fingerprint of split(s) {', '.join(changed)} of "
             f"'{source.get('data')}' differs from the one recorded")
