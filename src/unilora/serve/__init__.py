"""`unilora serve`: an OpenAI-compatible server for many adapters on one base model.

store.py (the adapter folders a server may read), residency.py (which adapters are attached: an
LRU), batch.py and sequence.py (the running batch and one generation), worker.py (the thread that
runs the model), protocol.py (request bodies and the error shape), app.py (the endpoints),
classify.py (classifier adapters), metrics.py, server.py (the process: uvicorn, signals).

Nothing here is imported eagerly: the CLI reads `settings` without the `serve` extra installed.
"""

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'unilora.serve' has no attribute '{name}'")
