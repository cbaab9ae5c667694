"""The installed `unilora` script and `python -m unilora`: the command line, after one thing that
must happen before torch and transformers load (seconds): a `serve` stopped by SIGTERM while they
load has nothing to drain, and ends with exit code 0 as process managers expect of a clean stop
(the server installs its own handling once it runs)."""

from __future__ import annotations

import os
import signal
import sys


def _stopped_while_loading(signum, frame) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # mid-import: no interpreter shutdown over half-loaded extension modules


def run() -> int:
    if sys.argv[1:2] == ["serve"]:
        signal.signal(signal.SIGTERM, _stopped_while_loading)
    from .cli.main import main

    return main()
