"""Reading the rows of a user's data file: CSV, JSON lines or a JSON array, decoded as UTF-8, each
failure naming the file and line; and the seeded train/test split of a file without a test file."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from ..core.errors import UniLoraError


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UniLoraError(f"{path}:{line}: byte 0x{data[err.start]:02x} is not UTF-8 text; save the file as UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV, JSON-lines, or JSON-array file."""
    text = read_utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UniLoraError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise UniLoraError(f"{path}: JSON nested too deeply; expected a list of objects") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise UniLoraError(f"{path}: item {bad} of the JSON array is not an object; expected a list of objects")
        return [(i + 1, r) for i, r in enumerate(rows)]
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise UniLoraError(f"{path}:{n} is not valid JSON; expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise UniLoraError(f"{path}:{n} is a JSON {type(row).__name__}, expected an object per line")
            rows.append((n, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise UniLoraError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


TEST_FRACTION = 0.2  # held out for testing when no test file is given


def seeded_split(rows: list, path: Path, seed: int, test_fraction: float) -> tuple[list, list]:
    """(train, test): a seeded random test_fraction of the rows (at least one) held out."""
    if len(rows) < 2:
        raise UniLoraError(f"data file '{path}' has {len(rows)} row; a train/test split needs at least 2")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(rows) * test_fraction))
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def row_field(where: str, row: dict, column: str) -> str:
    """Field `column` of a row as text; `where` names the row in errors ("data.csv:12")."""
    if column not in row:
        raise UniLoraError(f"{where}: field '{column}' is missing (fields: {sorted(k for k in row if k)[:8]})")
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UniLoraError(f"{where}: field '{column}' is {'null' if value is None else 'empty'}")
    if isinstance(value, (dict, list)):
        raise UniLoraError(f"{where}: field '{column}' is a JSON {type(value).__name__}, expected text or a label")
    return str(value)
