"""The server process: the app under uvicorn on one host and port.

A SIGTERM (or Ctrl-C) stops accepting connections and drains: requests in flight may finish for up
to `drain_timeout` seconds; then the worker ends what is left between two forwards, each with a 503
in OpenAI's shape (a stream gets an error event, then `[DONE]`), and the process exits 0. uvicorn
gives the handlers time to send those answers (it would otherwise cancel them at its own timeout,
which cuts streams and answers 500 with an empty body). A SIGTERM while the model still loads ends
the process the same way, with exit 0. A model that cannot be loaded stops the server too: one line
and exit code 2, as for any bad input.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import uvicorn

from ..core.errors import UniLoraError
from ..store.source import AdapterStore
from .app import create_app
from .settings import ServeSettings
from .worker import ABORT_WAIT_S

log = logging.getLogger("unilora.serve")
ANSWER_WAIT_S = 5.0  # after the worker has ended every request: how long the handlers have to answer


def exit_quietly_on_sigterm() -> None:
    """Until uvicorn takes the signals over, and again after it has drained and hands a SIGTERM back: a
    SIGTERM ends the process with exit code 0, as process managers expect of a clean stop."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal also starts the worker's drain."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain
        self._draining = threading.Event()

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if not self._draining.is_set():
            self._draining.set()
            threading.Thread(target=self._drain, name="unilora-drain", daemon=True).start()


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `unilora serve` until a signal stops it."""
    exit_quietly_on_sigterm()
    if settings.task not in ("causal-lm", "seq-cls"):
        raise UniLoraError(f"--task must be causal-lm or seq-cls, not '{settings.task}'")
    AdapterStore(settings.adapters, settings.allow_runtime_loading)  # a wrong folder fails before the port opens
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    running: list[uvicorn.Server] = []
    app = create_app(settings, on_load_failure=lambda: setattr(running[0], "should_exit", True))
    server = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout + ABORT_WAIT_S + ANSWER_WAIT_S) + 1,
                            limit_concurrency=settings.max_queue + settings.max_batch + 64,
                            timeout_keep_alive=5)
    running.append(DrainingServer(config, server.stop))
    running[0].run()
    if server.busy():
        # the model still loads, or a forward outlasted the drain and its abort wait: every client has its
        # answer, and torch's threads must not be torn down under a running op at interpreter exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if server.load_error is not None:
        raise UniLoraError(f"cannot serve '{settings.model}': {server.load_error}")
