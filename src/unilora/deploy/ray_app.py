"""`unilora serve` as a Ray Serve application: the same app on N replicas, requests for one
adapter routed to the replicas that already hold it.

Two deployments. `Router` is the HTTP ingress: it reads the body (bounded), takes the adapter
name from its `model` field, and forwards the request to `AdapterReplica` with that name as Ray
Serve's multiplexed model id, so Ray routes it to a replica that has served that adapter
(`@serve.multiplexed`). Each `AdapterReplica` runs the single-process server's app in-process
(its own worker, LRU of adapters and batches), so endpoints, errors and outputs are those of
`unilora serve`; responses stream back as they are produced. Every response names the replica
that answered in `x-unilora-replica` (its id and process id).

    unilora serve --adapters STORE --ray --replicas 2           # a local Ray cluster on this machine
    serve run unilora.deploy.ray_app:build adapters=STORE replicas=2 model=MODEL   # an existing cluster
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the route's annotations
import json
import os
import signal
from dataclasses import asdict, fields

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from ..core.errors import UniLoraError
from ..serve.app import create_app
from ..serve.http import error_response, read_body
from ..serve.protocol import RequestError
from ..serve.settings import ServeSettings
from ..store.names import is_adapter_name

REPLICA_HEADER = "x-unilora-replica"
FINE_TUNING_PATHS = ("v1/files", "v1/fine_tuning")  # the router's paths have no leading slash


async def asgi_call(app, method: str, path: str, headers: list, body: bytes):
    """Call an ASGI app in-process; yields ("start", status, headers), then body chunks."""
    queue: asyncio.Queue = asyncio.Queue()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the router cancels us instead

    async def send(message):
        await queue.put(message)

    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if task.exception() is not None:
                    raise task.exception()
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield ("start", message["status"], [(k.decode(), v.decode()) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
    finally:
        if not task.done():
            task.cancel()


async def _rest(stream):
    async for chunk in stream:
        yield chunk


def adapter_name(body: bytes, settings: ServeSettings) -> str:
    """The adapter a request's body names ("" for the base model or none): Ray's multiplexed id."""
    try:
        model = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError):
        return ""
    if not isinstance(model, str) or model in (settings.model_id, settings.model):
        return ""
    return model if is_adapter_name(model) else ""


@serve.deployment
class AdapterReplica:
    def __init__(self, settings: dict, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.app = create_app(ServeSettings(**settings))
        self.server = self.app.state.server
        self.server.load()  # here, not on a thread: Ray marks the replica ready when __init__ returns
        if self.server.load_error is not None:
            raise UniLoraError(f"cannot serve: {self.server.load_error}")
        context = serve.get_replica_context()
        self.name = f"{getattr(context, 'replica_id', None) and context.replica_id.unique_id or 'replica'}/{os.getpid()}"

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def adapter(self, name: str) -> str:
        # residency is the app's own LRU; this tells Ray's router which replica holds `name`
        return name

    async def __call__(self, method: str, path: str, headers: list, body: bytes):
        name = serve.get_multiplexed_model_id()
        if name:
            await self.adapter(name)
        async for part in asgi_call(self.app, method, path, headers, body):
            if isinstance(part, tuple):
                yield ("start", part[1], part[2] + [(REPLICA_HEADER, self.name)])
            else:
                yield part

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


ingress = FastAPI(title="unilora serve (Ray)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(ingress)
class Router:
    def __init__(self, replicas, settings: dict, trainer=None):
        self.replicas = replicas
        self.trainer = trainer  # the one replica that answers the fine-tuning API and trains its jobs
        self.settings = ServeSettings(**settings)

    # every method: the replica's app answers those it does not serve (405) in OpenAI's error shape
    @ingress.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def forward(self, request: Request, path: str):
        fine_tuning = self.trainer is not None and path.startswith(FINE_TUNING_PATHS)
        # an upload may hold a training file (the trainer's app checks it against --max-file-mb again)
        limit = (self.settings.max_file_mb << 20) + (64 << 10) if fine_tuning else self.settings.max_body_bytes
        try:
            body = await read_body(request, limit)
        except RequestError as err:
            return error_response(err.status, err.message)
        name = adapter_name(body, self.settings)
        if fine_tuning:
            handle = self.trainer.options(stream=True)
        else:
            handle = self.replicas.options(stream=True, multiplexed_model_id=name)
        query = f"?{request.url.query}" if request.url.query else ""
        stream = handle.remote(request.method, "/" + path + query, list(request.headers.items()), body)
        try:
            _, status, headers = await stream.__anext__()
        except Exception as err:  # the replica died before answering: the client sees it fail
            return error_response(503, f"the replica failed before answering ({type(err).__name__}); retry",
                                  retry_after=1)
        kept = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
        return StreamingResponse(_rest(stream), status_code=status, headers=kept)


def application(settings: ServeSettings, replicas: int):
    """The Ray Serve application: a router in front of `replicas` adapter replicas."""
    plain = asdict(settings)
    # no CPU reservations: a replica's torch threads share the machine's cores (split between the
    # replicas), and the router only moves bytes; reservations would leave a 2-core machine unable
    # to place the router beside two replicas
    threads = max(1, (os.cpu_count() or 1) // replicas)
    # serving replicas read the job store (fine-tuned models by their ft: names); one more replica,
    # alone, answers the fine-tuning API and trains the jobs between its decoding turns, so no two
    # processes ever train the same queued job
    serving = {**plain, "fine_tuning": False}
    replica = AdapterReplica.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    trainer = None
    if settings.fine_tuning:
        trainer = AdapterReplica.options(name="FineTuningReplica", num_replicas=1,
                                         ray_actor_options={"num_cpus": 0}).bind(plain, threads)
    return Router.options(ray_actor_options={"num_cpus": 0}).bind(replica.bind(serving, threads), plain, trainer)


def build(args: dict):
    """`serve run unilora.deploy.ray_app:build adapters=STORE [replicas=N] [model=...] [...]`: any
    ServeSettings field as key=value."""
    known = {f.name: f.type for f in fields(ServeSettings)}
    given = {k: v for k, v in args.items() if k != "replicas"}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UniLoraError(f"unknown settings {unknown}; known: {sorted(known)}")
    defaults = ServeSettings(adapters="")
    def typed_value(name: str, value):
        default = getattr(defaults, name)
        if isinstance(default, bool) and isinstance(value, str):  # bool("false") would be True
            return value.strip().lower() in ("1", "true", "yes", "on")
        return type(default)(value) if default is not None else value

    typed = {k: typed_value(k, v) for k, v in given.items()}
    return application(ServeSettings(**typed), int(args.get("replicas", 1)))


def serve_with_ray(settings: ServeSettings, host: str, port: int, replicas: int) -> None:
    """A local Ray cluster on this machine, the application on it, until SIGTERM or Ctrl-C; the
    cluster is shut down on the way out."""
    stop = asyncio.Event()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(settings, replicas), name="unilora", route_prefix="/")
        loop = asyncio.new_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.run_until_complete(stop.wait())
    finally:
        serve.shutdown()
        ray.shutdown()
