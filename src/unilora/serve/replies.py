"""The answer to one generation request: the sequences' events, collected into one JSON answer or
streamed as server-sent events, in OpenAI's shapes (protocol.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from . import protocol
from .protocol import RequestError, error_body
from .sequence import DoneEvent, ErrorEvent, Sequence, TextEvent

DISCONNECT_LOOK_S = 0.25  # how often a waiting non-stream request looks whether its client is still there


class ClientGone(Exception):
    """The client disconnected; nobody reads the answer."""


def sink_for(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    """A sequence's sink: its events, tagged with its index, onto the request's queue (thread-safe)."""
    def sink(event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
    return sink


class Reply:
    def __init__(self, kind: str, model: str, sequences: list[Sequence], with_logprobs: bool = False):
        self.kind = kind  # "text" (/v1/completions) or "chat"
        self.model = model
        self.sequences = sequences
        self.with_logprobs = with_logprobs
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled.set()

    def usage(self) -> dict:
        return protocol.usage(sum(len(s.prompt_ids) for s in self.sequences),
                              sum(len(s.generated) for s in self.sequences))

    def _logprobs(self, entries, text_offset: int = 0) -> dict | None:
        return protocol.logprobs_body(self.kind, entries, text_offset) if self.with_logprobs else None

    async def collect(self, request: Request, events: asyncio.Queue, timeout: float) -> JSONResponse:
        texts = [""] * len(self.sequences)
        logprobs: list[list] = [[] for _ in self.sequences]
        finishes: list[str | None] = [None] * len(self.sequences)
        waiting = len(self.sequences)
        give_up = time.monotonic() + timeout + 10  # the worker times requests out; this is the backstop
        next_look = time.monotonic() + DISCONNECT_LOOK_S
        while waiting:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_LOOK_S)
            except asyncio.TimeoutError:
                event = None
            now = time.monotonic()
            if now > give_up:
                self.cancel()
                raise RequestError(504, "the request timed out")
            if now >= next_look:  # also while tokens keep coming: a client gone must not cost a whole answer
                next_look = now + DISCONNECT_LOOK_S
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone()
            if event is None:
                continue
            if isinstance(event, TextEvent):
                texts[index] += event.text
                logprobs[index] += event.logprobs
            elif isinstance(event, DoneEvent):
                finishes[index] = event.finish_reason
                waiting -= 1
            elif isinstance(event, ErrorEvent):
                self.cancel()
                raise RequestError(event.status, event.message)
        choices = [protocol.choice(self.kind, i, t, f, delta=False, logprobs=self._logprobs(lp))
                   for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))]
        return JSONResponse({"id": self.id, "object": protocol.object_name(self.kind, False), "created": self.created,
                             "model": self.model, "choices": choices, "usage": self.usage()})

    async def stream(self, events: asyncio.Queue, include_usage: bool):
        def chunk(choices: list, usage=None) -> str:
            body = {"id": self.id, "object": protocol.object_name(self.kind, True), "created": self.created,
                    "model": self.model, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        waiting = len(self.sequences)
        sent = [0] * len(self.sequences)  # characters streamed per choice: a completion's text_offset
        try:
            if self.kind == "chat":
                yield chunk([protocol.first_chat_delta(s.index) for s in self.sequences])
            while waiting:
                index, event = await events.get()
                if isinstance(event, TextEvent):
                    logprobs = self._logprobs(event.logprobs, sent[index])
                    sent[index] += len(event.text)
                    yield chunk([protocol.choice(self.kind, index, event.text, None, delta=True, logprobs=logprobs)])
                elif isinstance(event, DoneEvent):
                    waiting -= 1
                    yield chunk([protocol.choice(self.kind, index, "", event.finish_reason, delta=True)])
                elif isinstance(event, ErrorEvent):
                    self.cancel()
                    yield f"data: {json.dumps(error_body(event.status, event.message))}\n\n"
                    break
            if include_usage and not waiting:
                yield chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client gone mid-stream stops its rows at the next step
