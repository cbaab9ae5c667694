"""HTTP helpers shared by the app and the Ray router: a bounded body, and the error answer."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from ..core.errors import UniLoraError
from ..store.names import UnknownAdapter
from .protocol import MODEL_NOT_FOUND, RequestError, error_body


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


def error_response(status: int, message: str, retry_after: int | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def error_of(err: UniLoraError) -> JSONResponse:
    """A library error as an answer: its status (400 unless it says), and 'model_not_found' for a name
    the store does not hold."""
    code = MODEL_NOT_FOUND if isinstance(err, UnknownAdapter) else None
    return error_response(getattr(err, "status", 400), str(err), code=code)
