"""POST /v1/classify: a classifier adapter's labels and probabilities for 1-256 texts, in one forward
on the worker thread (the model side is classifier.py)."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .protocol import ClassifyRequest, RequestError, parse
from .runtime import Server
from .scheduler import Overloaded


async def classify(raw: bytes, server: Server, tenant: str) -> JSONResponse:
    worker = server.require_ready()
    if server.classifier is None:
        raise RequestError(404, "this server serves causal LMs; /v1/classify needs `unilora serve --task seq-cls`")
    req = parse(ClassifyRequest, raw)
    name = server.adapter_of(req.model, tenant)
    if name is None:
        raise RequestError(400, "the base model has no trained classifier head; name a classifier adapter")
    adapter = await run_in_threadpool(server.prepare, name, 1)
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def done(result, error):
        def settle():
            if not answer.done():
                answer.set_exception(error) if error is not None else answer.set_result(result)
        loop.call_soon_threadsafe(settle)

    try:
        worker.call(lambda: server.classifier.run(adapter, req.input), done)
    except Overloaded as err:
        server.release(adapter, 1)
        raise RequestError(503, str(err), retry_after=1) from None
    labels, probs, tokens = await answer
    data = [{"index": i, "label": labels[int(row.argmax())], "probs": dict(zip(labels, map(float, row)))}
            for i, row in enumerate(probs)]
    return JSONResponse({"object": "list", "model": req.model, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
