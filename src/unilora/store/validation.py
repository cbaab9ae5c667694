"""One validation layer for everything read from disk, run before anything sized by a file is
allocated: JSON objects and their fields (types, ranges, required keys), safetensors headers
(names, dtypes, shapes) read without loading the data, finite values, and a memory budget
for what a file's numbers ask to build. Every failure is a UniLoraError naming the file.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import UniLoraError

MAX_JSON_BYTES = 16 * 2**20

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_INDEX_DTYPES = {"U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


class Fields:
    """Typed reads from one JSON object, each failure naming the file and the key."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise UniLoraError(f"{where} must be a JSON object, found {type(data).__name__}")
        self.data, self.where = data, where

    def _fail(self, key: str, expected: str):
        value = self.data.get(key, None)
        shown = "missing" if key not in self.data else f"{json.dumps(value)[:60]}"
        raise UniLoraError(f"{self.where}: '{key}' must be {expected}, found {shown}")

    def has(self, key: str) -> bool:
        return key in self.data

    def integer(self, key: str, low: int | None = None, high: int | None = None, default=...) -> int:
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        in_range = (low is None or (isinstance(value, int) and value >= low)) and (
            high is None or (isinstance(value, int) and value <= high))
        if isinstance(value, bool) or not isinstance(value, int) or not in_range:
            bounds = f" in [{low}, {high if high is not None else '∞'}]" if low is not None else ""
            self._fail(key, f"an integer{bounds}")
        return value

    def number(self, key: str, default=..., allow_none: bool = False) -> float | None:
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        if value is None and allow_none and key in self.data:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(key, "a finite number" + (" or null" if allow_none else ""))
        return float(value)

    def string(self, key: str, default=..., allow_none: bool = False) -> str | None:
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        if value is None and allow_none and key in self.data:
            return None
        if not isinstance(value, str):
            self._fail(key, "a string" + (" or null" if allow_none else ""))
        return value

    def boolean(self, key: str, default=...) -> bool:
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        if not isinstance(value, bool):
            self._fail(key, "true or false")
        return value

    def strings(self, key: str, default=...) -> list[str]:
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail(key, "a list of strings")
        return value

    def obj(self, key: str, default=...) -> "Fields":
        if key not in self.data and default is not ...:
            return Fields(default, f"{self.where} '{key}'")
        if not isinstance(self.data.get(key), dict):
            self._fail(key, "an object")
        return Fields(self.data[key], f"{self.where} '{key}'")


def read_json_object(path: Path, what: str) -> dict:
    """Parse a JSON file that must hold one object, refusing oversized or undecodable files."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UniLoraError(f"'{path}' is {size:,} bytes, too large for {what}; the file is damaged or not {what}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UniLoraError(f"'{path}' is not UTF-8 text (byte {err.start}); the file is damaged") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise UniLoraError(f"'{path}' is not valid JSON ({str(err)[:80]}); the file is damaged") from None
    if not isinstance(data, dict):
        raise UniLoraError(f"'{path}' must hold a JSON object ({what}), found {type(data).__name__}")
    return data


def tensor_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), read from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                header[name] = (view.get_dtype(), tuple(int(n) for n in view.get_shape()))
            return header
    except (SafetensorError, OSError, ValueError) as err:
        raise UniLoraError(f"cannot read '{path}': {str(err)[:120]}; the file is damaged or not safetensors") from None


def check_header(path: Path, header: dict, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Names, dtype kinds ("float" / "index") and shapes of a tensor file against what is expected."""
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise UniLoraError(
            f"'{path}' does not match its config: missing tensors {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for name, (shape, kind) in expected.items():
        dtype, found = header[name]
        allowed = _FLOAT_DTYPES if kind == "float" else _INDEX_DTYPES
        if dtype not in allowed:
            raise UniLoraError(f"'{path}': tensor '{name}' has dtype {dtype}, expected one of {sorted(allowed)}")
        if tuple(found) != tuple(shape):
            raise UniLoraError(f"'{path}': tensor '{name}' has shape {tuple(found)}, its config implies {tuple(shape)}")


def memory_budget() -> int:
    """Bytes this process can still allocate: free memory, and the address-space limit if set."""
    budget = 1 << 62
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    budget = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as handle:
                used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            used = 0
        budget = min(budget, soft - used)
    return budget


def check_allocation(nbytes: int, what: str) -> None:
    budget = memory_budget()
    if nbytes > budget // 2:
        raise UniLoraError(
            f"{what} would allocate {nbytes / 2**30:.1f} GiB, more than half of the {max(budget, 0) / 2**30:.1f} GiB "
            "this process can use; the file is damaged, or load it on a larger machine"
        )
