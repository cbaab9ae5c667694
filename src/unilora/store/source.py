"""The one adapter source of `unilora serve`, the vLLM resolver and the Ray app: a folder of adapter
folders (or an fsspec URL), an adapter's name being its folder's name.

Names are plain (letters, digits, `-`, `_`, `.`, no `..`, no separator), and the folder a name
resolves to must lie inside the store after symlinks are followed: a client can never make the
server read outside it. The store is read, never written.

A folder's `Signature` (inode, size and mtime of its two files) is taken on every use; a folder
replaced or removed since it was read is noticed before the next request runs on it. Reading goes
through the one validating reader (`store.io.read_adapter`).

Runtime loading (vLLM's `/v1/load_lora_adapter`) registers extra names that point at folders
under one root the operator named; it is off unless that root is given.

A store may also be an fsspec URL (`s3://bucket/adapters`, `memory://...`): names are listed
remotely, each adapter is read from a verified local copy (store/remote.py), and the signature is
the remote files' sizes and stamps.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec

from ..core.errors import UniLoraError
from .io import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, read_adapter
from .names import BadAdapter, UnknownAdapter, check_name, is_adapter_name
from .remote import is_url, list_adapters, local_copy, remote_signature

LISTING_TTL_S = 2.0  # /v1/models re-reads a large store at most this often


@dataclass(frozen=True)
class Signature:
    """What changes when an adapter folder's files are written again."""

    stamps: tuple

    @classmethod
    def of(cls, folder: Path) -> "Signature":
        stamps = []
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            info = (folder / name).stat()
            stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return cls(tuple(stamps))


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink followed, lies inside `root` (itself resolved)."""
    try:
        path.resolve(strict=True).relative_to(root)
        return True
    except (OSError, ValueError):
        return False


class AdapterStore:
    def __init__(self, root: str | os.PathLike, runtime_root: str | os.PathLike | None = None):
        self.url = str(root).rstrip("/") if is_url(str(root)) else None
        self.root = Path(tempfile.gettempdir()) if self.url else Path(root).resolve()
        if self.url is not None:
            try:
                list_adapters(self.url)
            except (OSError, ValueError, ImportError) as err:
                raise UniLoraError(f"--adapters '{root}' cannot be listed: {str(err)[:200]}") from None
        elif not self.root.is_dir():
            raise UniLoraError(f"--adapters '{root}' is not a folder; pass the folder that holds one folder per adapter")
        self.runtime_root = Path(runtime_root).resolve() if runtime_root is not None else None
        if self.runtime_root is not None and not self.runtime_root.is_dir():
            raise UniLoraError(f"--allow-runtime-loading '{runtime_root}' is not a folder")
        self._runtime: dict[str, Path] = {}  # names registered through /v1/load_lora_adapter
        self._lock = threading.Lock()
        self._listing: tuple[float, int, list[str]] | None = None

    # --- finding ---------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        """The folder of adapter `name`, checked to lie inside the store (or the runtime root)."""
        check_name(name)
        with self._lock:
            registered = self._runtime.get(name)
        if self.url is not None and registered is None:
            try:
                return local_copy(f"{self.url}/{name}")
            except (OSError, UniLoraError):
                raise UnknownAdapter(f"the model '{name}' does not exist: no adapter of that name in the store") from None
        root, folder = (self.runtime_root, registered) if registered is not None else (self.root, self.root / name)
        if not self._usable(root, folder):
            raise UnknownAdapter(f"the model '{name}' does not exist: no adapter of that name in the store")
        return folder

    @staticmethod
    def _usable(root: Path, folder: Path) -> bool:
        """Both files of an adapter there, each inside `root` once every symlink is followed."""
        return all((folder / name).is_file() and inside(root, folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME))

    def signature(self, name: str) -> Signature:
        if self.url is not None and name not in self._runtime:
            check_name(name)
            fs, folder = fsspec.core.url_to_fs(f"{self.url}/{name}")
            try:
                return Signature(remote_signature(fs, folder))
            except (OSError, UniLoraError):
                raise UnknownAdapter(f"the model '{name}' does not exist: no adapter of that name in the store") from None
        folder = self.folder(name)
        try:
            return Signature.of(folder)
        except OSError:
            raise UnknownAdapter(f"the model '{name}' does not exist: no adapter of that name in the store") from None

    def read(self, name: str) -> tuple[AdapterFile, Signature]:
        """The validated adapter and the signature it was read at (taken before and after the
        read: a folder rewritten during the read is read again, once)."""
        for _ in range(2):
            before = self.signature(name)
            folder = self.folder(name)
            try:
                adapter = read_adapter(folder)
            except UniLoraError as err:
                if isinstance(err, UnknownAdapter):
                    raise
                # a client sees the adapter's name, never where the server keeps its files
                message = str(err)
                for path in {str(folder.resolve()), str(folder)}:
                    message = message.replace(path, name)
                raise BadAdapter(f"adapter '{name}' cannot be served: {message}") from None
            if self.signature(name) == before:
                return adapter, before
        raise BadAdapter(f"adapter '{name}' is being rewritten; retry when its folder is complete")

    def names(self) -> list[str]:
        """Every adapter name: the store's folders holding an adapter config, and the runtime ones."""
        if self.url is not None:
            return self._remote_names()
        try:
            stamp = self.root.stat().st_mtime_ns
        except OSError:
            stamp = 0
        now = time.monotonic()
        with self._lock:
            cached = self._listing
            runtime = list(self._runtime)
        if cached is None or cached[1] != stamp or now - cached[0] > LISTING_TTL_S:
            found = []
            with os.scandir(self.root) as entries:
                for entry in entries:  # only what a request could use: a name, both files, inside the store
                    if is_adapter_name(entry.name) and self._usable(self.root, Path(entry.path)):
                        found.append(entry.name)
            cached = (now, stamp, sorted(found))
            with self._lock:
                self._listing = cached
        return sorted(set(cached[2]) | set(runtime))

    def _remote_names(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            cached, runtime = self._listing, list(self._runtime)
        if cached is None or now - cached[0] > LISTING_TTL_S:
            found = [n for n in list_adapters(self.url) if is_adapter_name(n)]
            cached = (now, 0, found)
            with self._lock:
                self._listing = cached
        return sorted(set(cached[2]) | set(runtime))

    # --- runtime loading --------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        """Serve the adapter folder `path` (under the runtime root) as `name`."""
        if self.runtime_root is None:
            raise PermissionError("runtime loading is off; start the server with --allow-runtime-loading ROOT")
        check_name(name)
        folder = Path(path) if Path(path).is_absolute() else self.runtime_root / path
        if not inside(self.runtime_root, folder):
            raise PermissionError(f"'{str(path)[:200]}' is not a folder inside the runtime-loading root")
        folder = folder.resolve()
        if not (folder / CONFIG_NAME).is_file():
            raise UnknownAdapter(f"'{str(path)[:200]}' holds no unilora adapter ({CONFIG_NAME} is missing)")
        if (self.root / name).exists() or name in self._runtime:
            raise BadAdapter(f"an adapter named '{name}' is already served; unload it first or choose another name")
        with self._lock:
            self._runtime[name] = folder

    def unregister(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._runtime.pop(name, None) is None:
                raise UnknownAdapter(f"no adapter named '{name}' was loaded at runtime")
