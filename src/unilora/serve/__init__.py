"""`unilora serve`: an OpenAI-compatible server for many adapters on one base model.

store.py (the adapter folders a server may read), residency.py (which adapters are attached: an
LRU), batch.py and sequence.py (the running batch and one generation), worker.py (the thread that
runs the model), protocol.py (request bodies and the error shape), app.py (the endpoints),
classify.py (classifier adapters), metrics.py, server.py (the process: uvicorn, signals).
"""

from .app import create_app
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
