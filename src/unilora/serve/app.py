"""The HTTP side: an OpenAI-compatible FastAPI app around one `Worker`.

How a request flows (docs/design.md draws it): the body is read up to `max_body_bytes` and
checked (protocol.py); the adapter name is checked against the store and, unless that version is
resident, its folder is read and validated on a thread-pool thread; the prompt is tokenized and
checked against the context; the sequences go to the worker's queue (503 when full); the
handler then awaits their events, streaming them as server-sent events or collecting one JSON
answer, and cancels them if the client goes away.

The model loads on a background thread after the socket is open: `GET /health` says 503 until it
is ready, and SIGTERM during the load ends the process cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import UniLoraError
from ..models.backbones import load_causal_lm
from ..training.causal_lm import prompt_ids
from .batch import check_model
from .classify import Classifier
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, RequestError, error_body, parse
from .residency import Residency
from .sequence import Sampling, Sequence
from .settings import ServeSettings
from ..store.names import check_name
from ..store.source import AdapterStore
from .worker import Overloaded, Worker

log = logging.getLogger("unilora.serve")
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Server:
    """Everything one app serves: the store, the model and its worker, the metrics."""

    def __init__(self, settings: ServeSettings, loaded=None, on_load_failure=None):
        self.settings = settings
        self.store = AdapterStore(settings.adapters, settings.allow_runtime_loading)
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self.classifier: Classifier | None = None
        self.tokenizer = None
        self.context: int | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()
        self._loaded = loaded  # (tokenizer, model) given by a caller instead of loading `settings.model`
        self.on_load_failure = on_load_failure  # called (on the loading thread) when the model cannot load

    @property
    def ready(self) -> bool:
        return self.worker is not None

    # --- start and stop --------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and start the worker (on a background thread at start-up)."""
        s = self.settings
        try:
            if s.task == "seq-cls":
                self.classifier = Classifier(s.model, self.store, self.metrics, s.max_resident, s.max_resident_bytes,
                                             s.factor_cache_bytes, loaded=self._loaded, device=s.device)
                self.tokenizer = self.classifier.tokenizer
                worker = Worker(None, self.store, self.tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                                metrics=self.metrics)
            else:
                tokenizer, model = self._loaded or load_causal_lm(s.model)
                model = model.to(device=s.device, dtype=DTYPES[s.dtype]).eval().requires_grad_(False)
                check_model(model)
                self.tokenizer = tokenizer
                self.context = getattr(model.config, "max_position_embeddings", None)
                residency = Residency(model, s.max_resident, s.max_resident_bytes, s.factor_cache_bytes, self.metrics)
                worker = Worker(residency, self.store, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                                metrics=self.metrics, tokenizer_lock=self.tokenizer_lock)
        except UniLoraError as err:
            self.load_error = str(err)
        except Exception as err:  # not the user's input: keep the traceback in the log
            log.exception("loading the model failed")
            self.load_error = f"{type(err).__name__}: {err}"
        if self.load_error is not None:
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        worker.start()
        self.worker = worker
        log.info("ready: %s, adapters from %s", s.model_id, self.store.root)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=self.settings.drain_timeout)

    # --- what handlers share ---------------------------------------------------------------
    def require_ready(self) -> Worker:
        if self.worker is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise RequestError(503, message, retry_after=5)
        return self.worker

    def adapter_of(self, model: str) -> str | None:
        """The store name a request's `model` names; None for the base model."""
        if model in (self.settings.model_id, self.settings.model):
            return None
        check_name(model)
        return model

    def prepared(self, adapter: str | None) -> tuple[object, object]:
        """(adapter file or None, signature): the adapter is read and validated only when the
        version in the store is not the resident one. Runs on a thread-pool thread."""
        if adapter is None:
            return None, None
        signature = self.store.signature(adapter)
        residency = self.worker.residency if self.worker is not None else None
        if residency is not None and residency.signature_of(adapter) == signature:
            return None, signature
        try:
            return self.store.read(adapter)
        except UniLoraError:
            self.metrics.adapter_errors.inc()
            raise

    def encode(self, prompt) -> list[int]:
        with self.tokenizer_lock:
            chat = isinstance(prompt, list)
            return prompt_ids(self.tokenizer, prompt, chat)


# --- endpoints ---------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def sampling_of(req, server: Server, prompt_lengths: list[int], default_tokens: int | None) -> Sampling:
    limit = server.settings.max_new_tokens_limit
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > limit:
        raise RequestError(400, f"'max_tokens' is {asked}, above this server's limit of {limit}")
    longest = max(prompt_lengths)
    room = (server.context - longest) if server.context else limit
    if room < 1:
        raise RequestError(400, f"the prompt has {longest} tokens, which fills the model's context of {server.context}")
    max_tokens = asked or min(default_tokens or limit, limit, room)
    if max_tokens > room:
        raise RequestError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                                f"context of {server.context} tokens; ask for fewer tokens")
    return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    stop=tuple(req.stop or ()))


async def generate(request: Request, server: Server, kind: str):
    """POST /v1/completions (kind "text") and /v1/chat/completions (kind "chat")."""
    worker = server.require_ready()
    if server.classifier is not None:
        raise RequestError(404, "this server serves classifiers; use POST /v1/classify")
    raw = await read_body(request, server.settings.max_body_bytes)
    req = parse(CompletionRequest if kind == "text" else ChatRequest, raw)
    adapter = server.adapter_of(req.model)
    try:
        prompts = req.prompt if kind == "text" else [req.conversation()]
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    adapter_file, signature = await run_in_threadpool(server.prepared, adapter)
    encoded = [await run_in_threadpool(server.encode, p) for p in prompts]
    if any(not ids for ids in encoded):
        raise RequestError(400, "a prompt is empty after tokenization; send some text")
    sampling = sampling_of(req, server, [len(ids) for ids in encoded],
                           COMPLETION_DEFAULT_TOKENS if kind == "text" else None)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + server.settings.request_timeout
    sequences = [Sequence(adapter, ids, sampling, _sink(loop, events, i), deadline, index=i,
                          adapter_file=adapter_file, signature=signature) for i, ids in enumerate(encoded)]
    try:
        worker.submit(sequences)
    except Overloaded as err:
        raise RequestError(503, str(err), retry_after=1) from None
    reply = Reply(kind, req.model, sequences)
    if req.stream:
        return StreamingResponse(reply.stream(events, req.include_usage), media_type="text/event-stream")
    return await reply.collect(request, events, server.settings.request_timeout)


def _sink(loop, events: asyncio.Queue, index: int):
    def sink(event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
    return sink


class Reply:
    """The answer to one generation request, as OpenAI shapes it."""

    def __init__(self, kind: str, model: str, sequences: list[Sequence]):
        self.kind = kind
        self.model = model
        self.sequences = sequences
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled.set()

    def usage(self) -> dict:
        prompt = sum(len(s.prompt_ids) for s in self.sequences)
        completion = sum(len(s.generated) for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str, finish: str | None, delta: bool) -> dict:
        if self.kind == "text":
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:  # the role came in the stream's first chunk
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _object(self, chunk: bool) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    async def collect(self, request: Request, events: asyncio.Queue, timeout: float) -> JSONResponse:
        texts = [""] * len(self.sequences)
        finishes: list[str | None] = [None] * len(self.sequences)
        waiting = len(self.sequences)
        give_up = time.monotonic() + timeout + 10  # the worker times requests out; this is the backstop
        while waiting:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected() or time.monotonic() > give_up:
                    self.cancel()
                    raise RequestError(504, "the request timed out") if time.monotonic() > give_up else _Gone()
                continue
            if event[0] == "text":
                texts[index] += event[1]
            elif event[0] == "done":
                finishes[index] = event[1]
                waiting -= 1
            else:
                self.cancel()
                raise RequestError(event[1], event[2])
        choices = [self._choice(i, t, f, delta=False) for i, (t, f) in enumerate(zip(texts, finishes))]
        return JSONResponse({"id": self.id, "object": self._object(False), "created": self.created,
                             "model": self.model, "choices": choices, "usage": self.usage()})

    async def stream(self, events: asyncio.Queue, include_usage: bool):
        def chunk(choices: list, usage=None) -> str:
            body = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        waiting = len(self.sequences)
        try:
            if self.kind == "chat":
                yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for s in self.sequences])
            while waiting:
                index, event = await events.get()
                if event[0] == "text":
                    yield chunk([self._choice(index, event[1], None, delta=True)])
                elif event[0] == "done":
                    waiting -= 1
                    yield chunk([self._choice(index, "", event[1], delta=True)])
                else:
                    self.cancel()
                    yield f"data: {json.dumps(error_body(event[1], event[2]))}\n\n"
                    break
            if include_usage and not waiting:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client gone mid-stream stops its rows at the next step


class _Gone(Exception):
    """The client disconnected; nobody reads the answer."""


def models_list(server: Server) -> dict:
    base = {"id": server.settings.model_id, "object": "model", "created": server.created, "owned_by": "unilora",
            "root": server.settings.model, "parent": None}
    adapters = [{"id": name, "object": "model", "created": server.created, "owned_by": "unilora",
                 "root": name, "parent": server.settings.model_id} for name in server.store.names()]
    return {"object": "list", "data": [base, *adapters]}


def error_response(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


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

    @app.exception_handler(_Gone)
    async def gone(request: Request, err: _Gone):
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
        worker = server.require_ready()
        if server.classifier is None:
            raise RequestError(404, "this server serves causal LMs; /v1/classify needs `unilora serve --task seq-cls`")
        raw = await read_body(request, settings.max_body_bytes)
        return await server.classifier.answer(request, raw, worker, server)

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
        if server.worker is not None:
            server.metrics.queue_depth.set(server.worker.queue_depth)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
               "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
