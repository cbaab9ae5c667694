"""Writing outputs into folders that users own, without ever losing what is there.

Every output (an adapter, a PEFT export, a run folder) is a folder with a known set of entry
names. `write_output_dir` writes it:

- a folder that does not exist, or is empty, is created whole: the entries are written into a
  hidden staging sibling, which is then renamed into place;
- a folder that exists and is not empty is refused unless `overwrite` is given. With it:
  - a folder holding only our own entries (our names, recognised as written by us) is replaced
    whole by one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`): at every instant the path
    holds the complete old or the complete new output. Where the filesystem cannot exchange,
    two renames are used and the old folder waits in a hidden sibling until the new one is in;
  - a folder that also holds entries of someone else keeps them: only our entries are replaced,
    each atomically, with the adapter config last (it carries the weights' checksum, so a reader
    caught between the two files is refused, never given a mix);
  - an entry with one of our names that we did not write (a PEFT adapter_config.json, say) is
    never replaced.
- Everything written follows the process umask, like any file the user creates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..core.errors import UniLoraError

# entry name -> does the existing entry at this path come from us?
Recognisers = dict[str, Callable[[Path], bool]]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and everything under it) the modes a plain create would have given."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths. False where the platform or filesystem cannot."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(target: Path, recognisers: Recognisers, overwrite: bool, what: str) -> None:
    """Refuse, before any work, an output folder that cannot or must not be written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UniLoraError(f"cannot write the {what} to '{target}': it exists and is not a folder")
    if target.is_dir():
        entries = sorted(p.name for p in target.iterdir())
        if entries and not overwrite:
            ours = all(name in recognisers and recognisers[name](target / name) for name in entries)
            raise UniLoraError(
                f"'{target}' already exists and holds {'a previous ' + what if ours else 'other files (' + ', '.join(entries[:4]) + ')'}; "
                f"choose a new folder, or pass --overwrite (overwrite=True) to replace only our own files there"
            )
        for name in entries:
            if name in recognisers and not recognisers[name](target / name):
                raise UniLoraError(
                    f"'{target / name}' was not written by unilora; refusing to replace it. Choose another folder"
                )
    parent = target.parent
    parent_existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if parent_existing is not None and not parent_existing.is_dir():
        raise UniLoraError(f"cannot write the {what} to '{target}': '{parent_existing}' is a file, not a folder")
    if parent_existing is not None and not os.access(parent_existing, os.W_OK | os.X_OK):
        raise UniLoraError(f"cannot write the {what} to '{target}': '{parent_existing}' is not writable")


def write_output_dir(target, write: Callable[[Path], None], recognisers: Recognisers, overwrite: bool,
                     what: str = "adapter", last: tuple[str, ...] = ()) -> Path:
    """Have write(staging) create the output's entries, then move them into `target` (see above).
    `last`: entries put in place after the others when files are replaced one by one."""
    target = Path(target)
    if target.is_symlink():  # write where the link points; the link itself stays
        target = target.resolve()
    check_writable(target, recognisers, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        unknown = sorted(p.name for p in staging.iterdir() if p.name not in recognisers)
        if unknown:  # a bug of ours: every entry we write must be recognisable later
            raise RuntimeError(f"writer produced unrecognised entries {unknown}")
        apply_umask(staging)
        existing = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
        if not existing:
            os.replace(staging, target)  # onto nothing, or onto an empty folder
        elif all(name in recognisers for name in existing):
            _replace_whole(staging, target)
        else:
            _replace_entries(staging, target, last, recognisers)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _replace_whole(staging: Path, target: Path) -> None:
    if exchange(staging, target):
        shutil.rmtree(staging)  # now holds the old output
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)


def _replace_entries(staging: Path, target: Path, last: tuple[str, ...], recognisers: Recognisers) -> None:
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: (n in last, n))
    stale = [p for p in target.iterdir() if p.name in recognisers and p.name not in names]
    for name in names:
        new, old = staging / name, target / name
        if new.is_dir() and old.is_dir():
            if exchange(new, old):
                shutil.rmtree(new)
                continue
            shutil.rmtree(old)
        os.replace(new, old)
    for path in stale:  # ours, from the previous output (a head the new one does not have)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
