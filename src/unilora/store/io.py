"""Adapter directories: adapter_config.json + adapter_model.safetensors.

Writing goes through `writing.write_output_dir` (nothing of anyone else's is replaced; a whole
adapter appears atomically) and refuses non-finite tensors. The config records the sha256 of the
weights file and of itself, so any change after saving is caught on load.

Reading validates everything before it is used, in an order that allocates nothing sized by
the file until the sizes are checked: the config's schema and checksum, the layout and its
fingerprint, the tensor header against the shapes the config implies, the memory that building
the projection needs, the weights' checksum, then the values (finite; VB-LoRA's indices and
weights in range). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.finite import check_finite
from ..core.layout import Layout, Slot
from ..core.tasks import LM_DATA_KINDS, METRICS, TASK_KINDS
from ..methods import PROJECTIONS
from .validation import Fields, check_allocation, check_header, read_json_object, tensor_header
from .writing import Recognisers, write_json_atomic, write_output_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_PREFIX = "head."
FORMAT_VERSION = 2  # 2: checksums of the weights and the config
MAX_LAYERS = 1_000_000
WRITER_METADATA = {"format": "pt", "writer": "unilora"}


# --- writing ------------------------------------------------------------------------------
def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=WRITER_METADATA)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def written_by_us(path: Path) -> bool:
    """A safetensors file whose header says unilora wrote it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("writer") == "unilora"
    except (SafetensorError, OSError, ValueError):
        return False


def _is_our_config(path: Path) -> bool:
    try:
        return read_json_object(path, "a unilora adapter config").get("format") == "unilora"
    except (UniLoraError, OSError):
        return False


ADAPTER_FILES: Recognisers = {
    CONFIG_NAME: _is_our_config,
    WEIGHTS_NAME: lambda p: written_by_us(p) or _is_our_config(p.with_name(CONFIG_NAME)),
}


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and _is_our_config(path / CONFIG_NAME)


def write_adapter_files(staging: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Weights, then the config with both checksums, into an (empty) folder."""
    check_finite(tensors, "refusing to save the adapter",
                 "the training diverged (lower the learning rate, or clip gradients) or the tensors were edited")
    save_tensors(tensors, staging / WEIGHTS_NAME)
    meta = {**meta, "weights_sha256": file_sha256(staging / WEIGHTS_NAME)}
    meta["config_sha256"] = config_sha256(meta)
    write_json_atomic(staging / CONFIG_NAME, meta)


def write_adapter_dir(directory, meta: dict, tensors: dict[str, torch.Tensor], overwrite: bool = True) -> Path:
    """Write an adapter folder (see writing.py for what is replaced and how)."""
    return write_output_dir(directory, lambda staging: write_adapter_files(staging, meta, tensors),
                            ADAPTER_FILES, overwrite, what="adapter", last=(CONFIG_NAME,))


# --- reading ------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A validated adapter directory."""

    path: Path
    meta: dict
    config: AdapterConfig
    layout: Layout
    tensors: dict[str, torch.Tensor]  # the projection's
    head: dict[str, torch.Tensor]  # modules_to_save, by parameter name

    @property
    def task(self) -> dict | None:
        return self.meta.get("task")


def _parse_layout(fields: Fields, config: AdapterConfig) -> Layout:
    rows = fields.data.get("layout")
    where = fields.where
    if not isinstance(rows, list) or not rows or len(rows) > MAX_LAYERS:
        raise UniLoraError(f"{where}: 'layout' must be a non-empty list of [name, in, out, rank] rows")
    slots = []
    for i, row in enumerate(rows):
        ok = (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and row[0]
              and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 2**31 for n in row[1:]))
        if not ok:
            raise UniLoraError(f"{where}: layout row {i} must be [name, in_features, out_features, rank], found {json.dumps(row)[:80]}")
        if row[3] != config.rank:
            raise UniLoraError(f"{where}: layout row {i} ('{row[0]}') has rank {row[3]} but the config says rank {config.rank}")
        slots.append(Slot(*row))
    if len({s.name for s in slots}) != len(slots):
        raise UniLoraError(f"{where}: the layout names a layer twice")
    layout = Layout(slots)
    if fields.string("layout_fingerprint") != layout.fingerprint():
        raise UniLoraError(f"{where}: the layout does not match its fingerprint (layers renamed or reordered); the config was changed after saving")
    if fields.integer("D", 1) != layout.D:
        raise UniLoraError(f"{where}: 'D' is {fields.data['D']} but the layout adds up to {layout.D}")
    return layout


def _check_meta(meta: dict, path: Path) -> tuple[AdapterConfig, Layout]:
    fields = Fields(meta, f"'{path}'")
    if meta.get("format") != "unilora":
        raise UniLoraError(f"'{path}' is not a unilora adapter config (no \"format\": \"unilora\")")
    version = fields.integer("format_version", 1)
    if version > FORMAT_VERSION:
        raise UniLoraError(f"adapter format version {version} is newer than this unilora understands ({FORMAT_VERSION}); upgrade unilora")
    if version >= 2 or fields.has("config_sha256"):
        if fields.string("config_sha256") != config_sha256(meta):
            raise UniLoraError(f"'{path}' was changed after it was saved (its checksum does not match); re-save the adapter from Python")
    try:
        config = AdapterConfig.from_dict(fields.obj("adapter").data)
    except TypeError as err:  # a dataclass field given twice or not at all
        raise UniLoraError(f"'{path}': bad 'adapter' section ({err})") from None
    except UniLoraError as err:
        raise UniLoraError(f"'{path}': {err}") from None
    for name in type(config.options).chosen_from_layout:
        if getattr(config, name) is None:
            raise UniLoraError(f"'{path}': a saved {config.method} adapter must record its {name}")
    layout = _parse_layout(fields, config)
    fields.obj("projection")
    heads = fields.strings("head_modules", default=[])
    if set(heads) != {h for h in heads if h}:
        raise UniLoraError(f"'{path}': 'head_modules' holds an empty name")
    fields.boolean("fan_in_fan_out", default=False)
    base = fields.obj("base_model", default={})
    base.string("class", default=None, allow_none=True)
    base.string("name_or_path", default=None, allow_none=True)
    if fields.has("task"):
        _check_task(fields.obj("task"), path)
    return config, layout


def _check_task(task, path: Path) -> None:
    """What `finetune` records: the task kind, model, data and what each kind needs."""
    kind = task.string("task", default="seq-cls")
    if kind not in TASK_KINDS:
        raise UniLoraError(f"'{path}': task 'task' must be 'seq-cls' or 'causal-lm', found {kind!r}")
    if kind == "seq-cls":
        labels = task.strings("label_names")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise UniLoraError(f"'{path}': task 'label_names' must hold at least two distinct names")
    else:
        if task.string("kind") not in LM_DATA_KINDS:
            raise UniLoraError(f"'{path}': task 'kind' must be one of {list(LM_DATA_KINDS)}")
        if task.string("metric", default=None, allow_none=True) not in (None, *METRICS):
            raise UniLoraError(f"'{path}': task 'metric' must be one of {list(METRICS)} or null")
    task.string("model")
    task.string("dataset", default=None, allow_none=True)
    task.integer("max_length", 1, 1 << 20)
    if task.has("data") and task.data["data"] is not None:
        source = task.obj("data")
        for key in ("data", "text_column", "label_column", "test_data"):
            source.string(key, default=None, allow_none=True)


def read_adapter(directory) -> AdapterFile:
    """Read and validate an adapter directory (see the module docstring for the order)."""
    path = Path(directory)
    if not path.is_dir():
        hint = ""
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if leftovers:
            hint = f" (a replace was interrupted: the previous adapter is in '{leftovers[0]}')"
        raise UniLoraError(f"adapter directory '{path}' does not exist{hint}; pass the folder that save_pretrained wrote")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise UniLoraError(f"'{path}' is not a unilora adapter: {name} is missing")
    meta = read_json_object(path / CONFIG_NAME, "a unilora adapter config")
    config, layout = _check_meta(meta, path / CONFIG_NAME)
    projection_cls = PROJECTIONS[config.method]
    weights = path / WEIGHTS_NAME
    header = tensor_header(weights)
    expected = projection_cls.stored_spec(layout, config)
    head_names = [n for n in header if n.startswith(HEAD_PREFIX)]
    if head_names and not meta.get("head_modules"):
        raise UniLoraError(f"'{weights}' holds head tensors but the config names no head_modules")
    expected.update({n: (header[n][1], "float") for n in head_names})
    check_header(weights, header, expected)
    check_allocation(projection_cls.build_bytes(layout, config), f"the {config.method} adapter in '{path}'")
    if "weights_sha256" in meta and file_sha256(weights) != meta["weights_sha256"]:
        raise UniLoraError(f"'{weights}' does not match the checksum in its config: the file is damaged or was replaced")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UniLoraError(f"cannot read '{weights}': {str(err)[:120]}") from None
    check_finite(tensors, f"'{weights}'", "the adapter is damaged or came from a diverged run")
    projection_cls.check_stored_values(tensors, config)
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    own = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    return AdapterFile(path, meta, config, layout, own, head)
