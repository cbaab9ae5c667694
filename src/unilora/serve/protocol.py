"""The OpenAI-compatible request bodies, checked before any work, and the error shape.

Fields OpenAI defines that this server does not implement are refused when set to anything but
their default (one line naming the field), never silently ignored; fields it does not know are
ignored, as OpenAI's own server does with newer clients.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_PROMPTS = 16
MAX_MESSAGES = 256
MAX_CLASSIFY_INPUTS = 256

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 422: "adapter_unusable",
               429: "rate_limited", 503: "overloaded", 504: "timeout"}


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, one line of `message`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "code": ERROR_CODES.get(status), "param": None}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "'n' must be 1 (send one request per sample)"
        if self.logprobs not in (None, False, 0):
            return "'logprobs' is not supported by this server"
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return prompts

    def unsupported(self) -> str | None:
        if self.echo:
            return "'echo' is not supported by this server"
        if self.best_of not in (None, 1):
            return "'best_of' must be 1"
        if self.suffix:
            return "'suffix' is not supported by this server"
        return super().unsupported()


class TextPart(BaseModel):
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(pattern="^(system|developer|user|assistant)$")
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "'tools' is not supported by this server"
        return super().unsupported()

    def conversation(self) -> list[dict]:
        # OpenAI's newer "developer" role is what chat templates call "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_CLASSIFY_INPUTS:
            raise ValueError(f"give 1 to {MAX_CLASSIFY_INPUTS} texts")
        return texts


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(default="", max_length=4096)


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The request body as `model`, or RequestError(400) naming the first problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(400, f"'{where}': {first['msg']}") from None
    problem = getattr(request, "unsupported", lambda: None)()
    if problem:
        raise RequestError(400, problem)
    return request


# --- the response shapes -----------------------------------------------------------------------
def choice(kind: str, index: int, text: str, finish: str | None, delta: bool) -> dict:
    """One choice of a completion ("text") or chat ("chat") answer, or of a stream's chunk (`delta`)."""
    if kind == "text":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:  # the role came in the stream's first chunk
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def first_chat_delta(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def object_name(kind: str, chunk: bool) -> str:
    if kind == "text":
        return "text_completion"
    return "chat.completion.chunk" if chunk else "chat.completion"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: int, root: str, parent: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "unilora", "root": root,
            "parent": parent}
