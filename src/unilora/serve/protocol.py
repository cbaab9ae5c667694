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
MAX_NESTING = 32  # levels of lists and objects in a request body (chat content parts need 5)
MAX_LOGIT_BIAS = 300  # entries of logit_bias
MAX_TOP_LOGPROBS = {"text": 5, "chat": 20}  # OpenAI's limits: completions' logprobs, chat's top_logprobs

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}
# a 404 is "model_not_found" only where a model was named and is not there (store.names.UnknownAdapter)
ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 422: "adapter_unusable", 429: "rate_limited",
               503: "overloaded", 504: "timeout"}
MODEL_NOT_FOUND = "model_not_found"


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, one line of `message`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "code": code or ERROR_CODES.get(status), "param": None}}


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
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    tool_choice: str | dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value):
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"give at most {MAX_LOGIT_BIAS} token biases")
        biases = {}
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys are token ids (non-negative integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases are from -100 to 100, got {bias} for token {key}")
            biases[int(key)] = float(bias)
        return biases

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "'n' must be 1 (send one request per sample)"
        if self.response_format not in (None, {"type": "text"}):
            return "'response_format' other than {\"type\": \"text\"} is not supported by this server"
        if self.tool_choice not in (None, "none"):
            return "'tool_choice' is not supported by this server (it serves no tools)"
        return None

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS["text"])
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

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS["chat"])
    tools: list | None = None
    functions: list | None = None

    def unsupported(self) -> str | None:
        if self.tools or self.functions:
            return "'tools' is not supported by this server"
        if self.top_logprobs and not self.logprobs:
            return "'top_logprobs' needs 'logprobs': true"
        return super().unsupported()

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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


def nesting(value) -> int:
    """How deep lists and objects nest in a decoded JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The request body as `model`, or RequestError(400) naming the first problem."""
    too_deep = RequestError(400, f"the request body nests JSON deeper than {MAX_NESTING} levels")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON ({err})") from None
    except RecursionError:  # the decoder's recursion is bounded by the interpreter's limit
        raise too_deep from None
    if nesting(body) > MAX_NESTING:
        raise too_deep
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
def choice(kind: str, index: int, text: str, finish: str | None, delta: bool, logprobs: dict | None = None) -> dict:
    """One choice of a completion ("text") or chat ("chat") answer, or of a stream's chunk (`delta`)."""
    if kind == "text":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if delta:  # the role came in the stream's first chunk
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def logprobs_body(kind: str, entries, text_offset: int = 0) -> dict:
    """The log-probabilities of generated tokens (sequence.TokenLogprob) in each API's shape; a
    completion's `text_offset` counts characters from the start of the generated text."""
    if kind == "text":
        offsets, at = [], text_offset
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}

    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


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
