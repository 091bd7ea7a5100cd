"""OpenAI's wire format as this server speaks it: request bodies, reading them, and the error shape.

Everything here is pure: no agent, no app. A request body is read with :func:`read_json` (size and time
limits, UTF-8, a JSON object of bounded depth whose strings are text and whose integers fit in 64 bits),
checked with :func:`refuse_unsupported` and parsed strictly with :func:`parse`; whatever is wrong becomes an
:class:`APIError`, answered as ``{"error": {message, type, param, code}}``. Input that nothing downstream can
hold is refused here, at the edge, so that no request can reach the model or the store with it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Sequence, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from store.schema import MAX_TAG_LENGTH

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have, in arrays and objects (OpenAI's deepest, a chat message's content
part, is 5). Deeper bodies are refused before pydantic, or anything else that recurses, walks them."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The integers a body may hold anywhere: what the engines' seeds and the database's columns can take."""
MAX_VERSION = 2**31 - 1
"""The largest adapter version: the store keeps versions in 32-bit columns (PostgreSQL's INTEGER)."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# --- errors: OpenAI's shape ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused (or may retry), answered as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def client_gone(what: str) -> APIError:
    """The answer to a client that hung up (nginx's 499): nobody reads it, the access log and metrics do."""
    return APIError(499, f"the client closed the connection {what}", code="client_disconnected")


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.role``)."""
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    param = ".".join(parts) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value" if first["type"] != "missing" else "missing")


# --- request bodies ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    # OpenAI has many optional fields this server does not implement; unknown ones are ignored, the few that
    # would change the meaning of the answer are refused by refuse_unsupported.
    model_config = ConfigDict(extra="ignore")


class S2AgentOptions(_Body):
    model_config = ConfigDict(extra="forbid")
    route: Literal["auto", "system1", "system2"] = "auto"
    method: str | None = None
    tag: str | None = Field(None, max_length=MAX_TAG_LENGTH)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """What chat and raw completions share: the model name, sampling, streaming and the ``s2agent`` options."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = None
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, OpenAI's JSON) -> bias in [-100, 100], added to the logits before sampling."""
    s2agent: S2AgentOptions = Field(default_factory=S2AgentOptions)

    @property
    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs; a 400 naming the field for a key or a value out of range."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias",
                               code="invalid_value")
            if not -100.0 <= bias <= 100.0:
                raise APIError(400, f"logit_bias: the bias of token {key} must be between -100 and 100",
                               param="logit_bias", code="invalid_value")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token the response reports; None: no log-probs at all."""
        raise NotImplementedError


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class RollbackRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=0, le=MAX_VERSION)
    """The version to serve again; None: the serving adapter's parent; 0: the base model."""
    scope: str | None = None


# --- reading them --------------------------------------------------------------------------------------------
def refuse_unsupported(data: dict[str, Any], fields: Sequence[str]) -> None:
    """Refuse the OpenAI options that would change what the answer means if silently ignored."""
    for name in fields:
        value = data.get(name)
        if name == "response_format" and isinstance(value, dict) and value.get("type", "text") == "text":
            continue
        if name == "best_of" and value == 1:
            continue
        if value:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


async def read_json(request: Request, limit: int, timeout: float | None = None) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (declared or streamed), 408 when it takes longer
    than ``timeout`` seconds to arrive, 400 for anything malformed or that :func:`check_json` refuses."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise APIError(400, "Content-Length is not a number", code="invalid_body")
        if len(declared) > 18 or int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:  # a slow client holds a connection and a task: answer, and close the connection
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise client_gone("before its request body arrived") from None
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_body") from None
    if not text.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_body")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # the parser recurses per level: ~1,000 levels exhaust it
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError as exc:  # a number past Python's int-from-string limit (4,300 digits), NaN, Infinity
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_body")
    check_json(data)
    return data


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are Python's extensions to JSON, not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def check_json(data: Any) -> None:
    """Refuse what the JSON parser accepts but nothing downstream can hold, naming where it is.

    Nesting deeper than :data:`MAX_JSON_DEPTH`; a string with a lone surrogate (``"\\ud800"`` is valid JSON
    but no text: the tokenizer, the database and the response encoder all fail on it); an integer outside
    64 bits (a seed of 2**70 overflows the engine's generator, a version of 10**30 the database's column).
    It runs on the event loop, so the common case is one quick pass (about a tenth of the parse's time on
    a 1 MB body); only a body that fails is walked again, slowly, to name the field."""
    if not _acceptable(data):
        _name_the_problem(data)


def _acceptable(data: Any) -> bool:
    """The quick pass: iterative (depth costs nothing), no paths, ASCII strings skipped in O(1)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            return False
        if type(value) is dict:
            if any(not key.isascii() and _LONE_SURROGATE.search(key) for key in value):
                return False
            value = value.values()
        for item in value:
            kind = type(item)
            if kind is str:
                if not item.isascii() and _LONE_SURROGATE.search(item):
                    return False
            elif kind is int:
                if not INT64_MIN <= item <= INT64_MAX:
                    return False
            elif (kind is dict or kind is list) and item:
                stack.append((item, depth + 1))
    return True


def _name_the_problem(data: Any) -> None:
    """The slow pass, for a body the quick one refused: the first problem as a 400 naming its field. It
    refuses exactly what the quick pass refuses (a non-empty container at depth ``MAX_JSON_DEPTH``)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)) and value and depth >= MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_body")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path or None)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path or None)
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            raise APIError(400, f"{path}: integers must fit in 64 bits ({INT64_MIN} to {INT64_MAX})", param=path,
                           code="invalid_value")
    raise APIError(400, "request body holds a value this server cannot take", code="invalid_body")


def _check_text(value: str, param: str | None) -> None:
    if _LONE_SURROGATE.search(value):
        where = f"{param}: " if param else ""
        raise APIError(400, f"{where}a string holds a lone UTF-16 surrogate (such as \\ud800), which is not text",
                       param=param, code="invalid_value")


def parse(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as a ``model``, strictly (no "1" for 1); the first problem as a 400."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from None
