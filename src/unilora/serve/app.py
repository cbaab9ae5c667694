"""The HTTP side: the OpenAI-compatible FastAPI app, its routes, and what every request passes
through (the API key, the error shape, the metrics).

The rooms behind it: runtime.py (what the app serves: store, model, worker; loading and stopping),
completions.py and classify.py (the handlers), replies.py (an answer collected or streamed),
protocol.py (request bodies and response shapes), adapters.py (a request's adapter, prepared),
scheduler.py and worker.py (the model's thread), sampling.py, sequence.py, batch.py, residency.py.

The model loads on a background thread after the socket is open: `GET /health` says 503 until it
is ready, and SIGTERM during the load ends the process cleanly.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import UniLoraError
from . import protocol
from .classify import classify as classify_texts
from .completions import generate
from .http import error_response, read_body
from .protocol import LoadAdapterRequest, RequestError, parse
from .replies import ClientGone
from .runtime import Server
from .settings import ServeSettings


def models_list(server: Server) -> dict:
    base = protocol.model_card(server.settings.model_id, server.created, server.settings.model, None)
    adapters = [protocol.model_card(name, server.created, name, server.settings.model_id) for name in server.store.names()]
    return {"object": "list", "data": [base, *adapters]}


def create_app(settings: ServeSettings, loaded=None, on_load_failure=None) -> FastAPI:
    """The app. `loaded` = (tokenizer, model) serves that model instead of loading `settings.model`;
    `on_load_failure()` is called if the model cannot be loaded (the process then stops)."""
    server = Server(settings, loaded, on_load_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="unilora-load", daemon=True).start()
        yield
        await run_in_threadpool(server.stop)

    app = FastAPI(title="unilora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key, error shape and metrics for every request."""
        started = time.perf_counter()
        endpoint = request.url.path if request.url.path in KNOWN_PATHS else "other"
        key = settings.api_key
        if key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                response = error_response(401, "missing or wrong API key; send 'Authorization: Bearer <key>'")
                server.metrics.requests.labels(endpoint, "401").inc()
                return response
        response = await call_next(request)
        server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        server.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error_response(err.status, err.message, err.retry_after)

    @app.exception_handler(UniLoraError)
    async def bad_input(request: Request, err: UniLoraError):
        return error_response(getattr(err, "status", 400), str(err))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, err: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        # a bug of ours: the client gets the error shape, the log keeps the traceback (Starlette
        # re-raises it after this answer is sent)
        server.metrics.requests.labels("other", "500").inc()
        return error_response(500, f"internal error ({type(err).__name__}); see the server log")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(err.status_code, message.get(err.status_code, str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(400, f"bad request: {err.errors()[0].get('msg', 'invalid')}")

    @app.get("/health")
    async def health():
        if server.ready:
            return {"status": "ok"}
        return error_response(503, f"the model failed to load: {server.load_error}" if server.load_error
                              else "the model is still loading", retry_after=5)

    @app.get("/v1/models")
    async def models():
        return models_list(server)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, server, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, server, "chat")

    @app.post("/v1/classify")
    async def classify(request: Request):
        server.require_ready()
        return await classify_texts(await read_body(request, settings.max_body_bytes), server)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req = parse(LoadAdapterRequest, await read_body(request, settings.max_body_bytes))
        try:
            server.store.register(req.lora_name, req.lora_path)
        except PermissionError as err:
            raise RequestError(403, str(err)) from None
        return {"status": "ok", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        req = parse(LoadAdapterRequest, await read_body(request, settings.max_body_bytes))
        if settings.allow_runtime_loading is None:
            raise RequestError(403, "runtime loading is off; start the server with --allow-runtime-loading ROOT")
        server.store.unregister(req.lora_name)
        return {"status": "ok", "lora_name": req.lora_name}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
               "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
