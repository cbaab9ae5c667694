"""Adapter names a client may use: plain names, never paths.

A name is 1-128 letters, digits, `-`, `_` or `.`, starts with a letter or digit and holds no `..`:
it can name a folder inside a store and nothing else. The server, the vLLM resolver and the Ray
Serve app all check names here.
"""

from __future__ import annotations

import re

from ..core.errors import UniLoraError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnknownAdapter(UniLoraError):
    """No adapter of that name in the store (HTTP 404)."""

    status = 404


class BadAdapter(UniLoraError):
    """The adapter exists but cannot be served: damaged, refused by the reader, or made for
    another base model (HTTP 422)."""

    status = 422


def is_adapter_name(name) -> bool:
    """Whether `name` is a plain adapter name (the one rule, see the module docstring)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def check_name(name) -> str:
    """A plain adapter name, or UnknownAdapter naming the rule (never a path)."""
    if not is_adapter_name(name):
        shown = name[:80] if isinstance(name, str) else type(name).__name__
        raise UnknownAdapter(f"'{shown}' is not an adapter name: names are 1-128 letters, digits, '-', '_' or '.', "
                             "start with a letter or digit, and hold no '..' or path separator")
    return name
