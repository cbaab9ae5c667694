"""Adapter folders behind fsspec URLs (`file://`, `memory://`; `s3://`, `gs://` with the user's
fsspec backend), read through a local cache.

A remote folder is copied into the cache as a version named by its remote signature (sizes and
modification stamps of its two files), read back through the validating reader (so the
checksums its config carries are checked on the cached bytes), and only then put in place by one
rename: the cache never holds a half-copied version under a usable name. A version the remote
no longer has is pruned after its replacement is in place; the cache deletes only folders it
made (each holds our marker file).

`local_copy(url)` is what `from_pretrained`, `load_adapter`, the server's store and the vLLM
resolver call.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import fsspec

from ..core.errors import UniLoraError
from ..core.resources import cache_root
from .io import CONFIG_NAME, WEIGHTS_NAME, read_adapter

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MARKER = ".unilora-cache"
MAX_ADAPTER_BYTES = 1 << 30  # a remote file larger than this is refused before it is copied


def is_url(path) -> bool:
    return isinstance(path, str) and bool(URL.match(path))


def adapters_cache() -> Path:
    return cache_root() / "adapters"


def _digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def remote_signature(fs, folder: str) -> tuple:
    """What changes when the remote folder's files are written again."""
    stamps = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            info = fs.info(f"{folder}/{name}")
        except (FileNotFoundError, OSError):
            raise UniLoraError(f"'{folder}' holds no unilora adapter ({name} is missing)") from None
        if info.get("type") != "file":
            raise UniLoraError(f"'{folder}/{name}' is not a file")
        if int(info.get("size") or 0) > MAX_ADAPTER_BYTES:
            raise UniLoraError(f"'{folder}/{name}' is larger than {MAX_ADAPTER_BYTES} bytes; not an adapter of ours")
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") \
            or info.get("created") or info.get("md5")
        stamps.append((name, int(info.get("size") or 0), str(stamp)))
    return tuple(stamps)


def local_copy(url: str, cache: Path | None = None) -> Path:
    """A local, validated copy of the adapter folder at `url` (fetched again when the remote changed)."""
    fs, folder = fsspec.core.url_to_fs(url)
    folder = folder.rstrip("/")
    signature = remote_signature(fs, folder)
    home = (cache or adapters_cache()) / _digest(url)
    target = home / _digest(repr(signature))
    if (target / MARKER).is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=home))
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            fs.get_file(f"{folder}/{name}", str(staging / name))
        if remote_signature(fs, folder) != signature:
            raise UniLoraError(f"'{url}' changed while it was copied; try again")
        read_adapter(staging)  # the checksums in its config, on the bytes we hold
        (staging / MARKER).write_text(url + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process put the same version in place first
            if not (target / MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _prune(home, keep=target)
    return target


def _prune(home: Path, keep: Path) -> None:
    """Remove older versions of one adapter that this cache made."""
    for old in home.iterdir():
        if old != keep and old.is_dir() and not old.name.startswith(".fetch-") and (old / MARKER).is_file():
            shutil.rmtree(old, ignore_errors=True)


def list_adapters(url: str) -> list[str]:
    """Names of the folders under `url` that hold an adapter config."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    names = []
    for entry in fs.ls(root, detail=True):
        if entry.get("type") == "directory":
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if fs.exists(f"{root}/{name}/{CONFIG_NAME}"):
                names.append(name)
    return sorted(names)


def open_adapter(directory):
    """`read_adapter` of a local folder, or of the local copy of an fsspec URL."""
    return read_adapter(local_copy(directory) if is_url(directory) else directory)
