"""Adapter directories: adapter_config.json + adapter_model.safetensors, written atomically.

A save goes to a temporary sibling directory first and is renamed into place at the end, so a
crash or a bad input never leaves a half-written adapter. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UniLoraError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter_dir(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write config and tensors into `directory`, replacing it as a whole only on success."""

    def write(staging: Path) -> None:
        save_tensors(tensors, staging / WEIGHTS_NAME)
        write_json_atomic(staging / CONFIG_NAME, config)

    return write_directory_atomic(directory, write)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_directory_atomic(directory: str | os.PathLike, write) -> Path:
    """Call write(staging_dir) on a temporary sibling, then rename it to `directory`."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise UniLoraError(f"cannot write to '{target}': it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(directory)
    if not path.is_dir():
        raise UniLoraError(f"adapter directory '{path}' does not exist; pass the folder that save_pretrained wrote")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise UniLoraError(f"'{path}' is not a unilora adapter: {name} is missing")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise UniLoraError(f"'{path / CONFIG_NAME}' is not valid JSON ({err}); the adapter is damaged") from None
    if config.get("format") != "unilora" or "adapter" not in config:
        raise UniLoraError(f"'{path / CONFIG_NAME}' is not a unilora adapter config (no 'format': 'unilora')")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise UniLoraError(
            f"adapter format version {config['format_version']} is newer than this unilora understands "
            f"({FORMAT_VERSION}); upgrade unilora"
        )
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise UniLoraError(f"cannot read '{path / WEIGHTS_NAME}': {err}") from None
    return config, tensors
