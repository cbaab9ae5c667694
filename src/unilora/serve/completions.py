"""POST /v1/completions (kind "text") and /v1/chat/completions (kind "chat"): the body checked, the
prompts tokenized and checked against the context, the adapter prepared (the last check, so that
nothing is held for a request refused before), the sequences handed to the worker (503 when its
queue is full), then the reply collected or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .http import read_body
from .protocol import ChatRequest, CompletionRequest, RequestError, parse
from .replies import Reply, sink_for
from .runtime import Server
from .sampling import COMPLETION_DEFAULT_TOKENS, sampling_of
from .scheduler import Overloaded
from .sequence import Sequence
from .tenants import tenant_of


async def generate(request: Request, server: Server, kind: str):
    worker = server.require_ready()
    if server.classifier is not None:
        raise RequestError(404, "this server serves classifiers; use POST /v1/classify")
    raw = await read_body(request, server.settings.max_body_bytes)
    req = parse(CompletionRequest if kind == "text" else ChatRequest, raw)
    name = server.adapter_of(req.model, tenant_of(request))
    try:
        prompts = req.prompt if kind == "text" else [req.conversation()]
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    encoded = [await run_in_threadpool(server.encode, p) for p in prompts]
    if any(not ids for ids in encoded):
        raise RequestError(400, "a prompt is empty after tokenization; send some text")
    sampling = sampling_of(req, server.settings.max_new_tokens_limit, server.context, [len(ids) for ids in encoded],
                           COMPLETION_DEFAULT_TOKENS if kind == "text" else None, server.vocab_size)
    adapter = await run_in_threadpool(server.prepare, name, len(encoded)) if name is not None else None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + server.settings.request_timeout
    sequences = [Sequence(adapter, ids, sampling, sink_for(loop, events, i), deadline, index=i)
                 for i, ids in enumerate(encoded)]
    try:
        worker.submit(sequences)
    except Overloaded as err:
        server.release(adapter, len(sequences))
        raise RequestError(503, str(err), retry_after=1) from None
    reply = Reply(kind, req.model, sequences, with_logprobs=sampling.top_logprobs is not None)
    if req.stream:
        return StreamingResponse(reply.stream(events, req.include_usage), media_type="text/event-stream")
    return await reply.collect(request, events, server.settings.request_timeout)
