"""The server process: the app under uvicorn on one host and port.

uvicorn owns the signals: SIGTERM or Ctrl-C stops accepting connections, lets requests in flight
finish for up to `drain_timeout` seconds, then runs the app's shutdown (the worker fails what is
left with 503) and the process exits 0. A SIGTERM while the model still loads ends it the same way.
A model that cannot be loaded stops the server too: one line and exit code 2, as for any bad input.
"""

from __future__ import annotations

import logging
import signal

import uvicorn

from ..core.errors import UniLoraError
from .app import create_app
from .settings import ServeSettings
from ..store.source import AdapterStore


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `unilora serve` until a signal stops it."""
    if settings.task not in ("causal-lm", "seq-cls"):
        raise UniLoraError(f"--task must be causal-lm or seq-cls, not '{settings.task}'")
    AdapterStore(settings.adapters, settings.allow_runtime_loading)  # a wrong folder fails before the port opens
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    running: list[uvicorn.Server] = []
    app = create_app(settings, on_load_failure=lambda: setattr(running[0], "should_exit", True))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(max(1, settings.drain_timeout)),
                            limit_concurrency=settings.max_queue + settings.max_batch + 64,
                            timeout_keep_alive=5)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found at start:
    # a handler that does nothing makes a drained shutdown exit 0, as process managers expect
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    running.append(uvicorn.Server(config))
    running[0].run()
    failed = app.state.server.load_error
    if failed is not None:
        raise UniLoraError(f"cannot serve '{settings.model}': {failed}")
