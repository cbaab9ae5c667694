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
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import UniLoraError
from . import finetuning, protocol
from .classify import classify as classify_texts
from .completions import generate
from .http import error_of, error_response, read_body
from .protocol import LoadAdapterRequest, RequestError, parse
from .replies import ClientGone
from .runtime import JOB_PREFIX, Server
from .settings import ServeSettings
from .tenants import DEFAULT_TENANT, tenant_of


def models_list(server: Server, tenant: str) -> dict:
    """The base model, every adapter of the store a request could use (a store folder named like the
    base model is never reached: that name means the base) and the tenant's fine-tuned models."""
    base = protocol.model_card(server.settings.model_id, server.created, server.settings.model, None)
    base_names = {server.settings.model_id, server.settings.model}
    adapters = [protocol.model_card(name, server.created, name, server.settings.model_id)
                for name in server.store.names() if name not in base_names and not name.startswith(JOB_PREFIX)]
    tuned = [protocol.model_card(name, server.created, name, server.settings.model_id)
             for name in sorted(server.fine_tuned_models(tenant)) if ":ckpt-step-" not in name]
    return {"object": "list", "data": [base, *adapters, *tuned]}


def endpoint_of(path: str) -> str:
    """The metrics' endpoint label: the path for the app's own routes, else "other" (bounded labels)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v1/files/"):
        return "/v1/files/{id}"
    if path.startswith("/v1/fine_tuning/jobs/"):
        return "/v1/fine_tuning/jobs/{id}"
    return path if path in KNOWN_PATHS else "other"


class Guard:
    """The API key and the metrics of every request. A plain ASGI middleware: the request's receive
    channel reaches the handler untouched, so a handler notices its client disconnecting (Starlette's
    BaseHTTPMiddleware wraps that channel and hides it)."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server
        self.keys = server.keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        endpoint = endpoint_of(scope["path"])
        scope["unilora.tenant"] = DEFAULT_TENANT
        if self.keys is not None and scope["path"].startswith("/v1/"):
            tenant = self.keys.tenant(dict(scope["headers"]).get(b"authorization", b""))
            if tenant is None:
                self.server.metrics.requests.labels(endpoint, "401").inc()
                response = error_response(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
            scope["unilora.tenant"] = tenant
        status = 500  # what the client gets if the app raises before answering (a bug of ours)

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status)).inc()
            self.server.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


def create_app(settings: ServeSettings, loaded=None, on_load_failure=None) -> FastAPI:
    """The app. `loaded` = (tokenizer, model) serves that model instead of loading `settings.model`;
    `on_load_failure()` is called if the model cannot be loaded (the process then stops)."""
    server = Server(settings, loaded, on_load_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start_loading()
        yield
        await run_in_threadpool(server.stop)

    app = FastAPI(title="unilora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    app.add_middleware(Guard, server=server)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error_response(err.status, err.message, err.retry_after)

    @app.exception_handler(UniLoraError)
    async def bad_input(request: Request, err: UniLoraError):
        return error_of(err)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, err: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        # a bug of ours: the client gets the error shape, the log keeps the traceback (Starlette
        # re-raises it after this answer is sent); Guard counts it under its endpoint
        return error_response(500, f"internal error ({type(err).__name__}); see the server log")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(err.status_code, message.get(err.status_code, str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(400, f"bad request: {err.errors()[0].get('msg', 'invalid')}")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if server.ready:
            return {"status": "ok"}
        return error_response(503, f"the model failed to load: {server.load_error}" if server.load_error
                              else "the model is still loading", retry_after=5)

    @app.get("/v1/models")
    async def models(request: Request):
        return models_list(server, tenant_of(request))

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        cards = models_list(server, tenant_of(request))["data"]
        found = next((card for card in cards if card["id"] == model_id), None)
        if found is None:
            return error_response(404, f"the model '{model_id}' does not exist", code=protocol.MODEL_NOT_FOUND)
        return found

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, server, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, server, "chat")

    @app.post("/v1/classify")
    async def classify(request: Request):
        server.require_ready()
        return await classify_texts(await read_body(request, settings.max_body_bytes), server, tenant_of(request))

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

    finetuning_routes(app, server)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


FINE_TUNING_ROUTES = [  # (method, path, handler): the handler gets the request, the server and the path's ids
    ("POST", "/v1/files", finetuning.upload_file),
    ("GET", "/v1/files", finetuning.list_files),
    ("GET", "/v1/files/{file_id}", finetuning.retrieve_file),
    ("DELETE", "/v1/files/{file_id}", finetuning.delete_file),
    ("GET", "/v1/files/{file_id}/content", finetuning.file_content),
    ("POST", "/v1/fine_tuning/jobs", finetuning.create_job),
    ("GET", "/v1/fine_tuning/jobs", finetuning.list_jobs),
    ("GET", "/v1/fine_tuning/jobs/{job_id}", finetuning.retrieve_job),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", finetuning.cancel_job),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events", finetuning.job_events),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", finetuning.job_checkpoints),
]


def finetuning_routes(app: FastAPI, server: Server) -> None:
    """/v1/files and /v1/fine_tuning/jobs (finetuning.py)."""

    def endpoint_for(handler):
        async def endpoint(request: Request):
            return await handler(request, server, **request.path_params)

        endpoint.__name__ = handler.__name__
        return endpoint

    for method, path, handler in FINE_TUNING_ROUTES:
        app.add_api_route(path, endpoint_for(handler), methods=[method])


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
               "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/files", "/v1/fine_tuning/jobs"}
