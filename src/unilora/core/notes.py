"""Notes: what a user should know about a choice the library made for them (a default it chose,
an input it trimmed), which is neither an error nor a sign of one.

Every note goes through `note()`, as a `Note` warning: a Python caller can filter or record them
like any warning, and the command line renders each as one `note: ...` line on stderr (`render`),
never as a warning with a source line.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator


class Note(UserWarning):
    """A choice the library made for the user, said once."""


def note(message: str) -> None:
    warnings.warn(message, Note, stacklevel=2)


@contextlib.contextmanager
def render() -> Iterator[None]:
    """Inside the block, notes print as `note: ...` on stderr (every one, not once per place);
    other warnings print as Python prints them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", Note)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, Note):
                print(f"note: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
