"""The HTTP face of an :class:`~agent.loop.Agent`: OpenAI's wire format, so the official clients work unchanged.

Run it with ``agent serve`` (see :mod:`agent.cli`), or from Python::

    from agent import Agent, AgentConfig
    from agent.server import serve
    serve(Agent(AgentConfig.load("agent.toml")), host="127.0.0.1", port=8000)

then point any OpenAI client at it::

    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is 47 + 38?"}],
        extra_body={"s2agent": {"route": "auto", "tag": "arithmetic"}})

The server holds no decisions: it parses, validates, calls the ``Agent`` and formats the result. Which
request goes where:

- ``POST /v1/chat/completions`` with one user message (optionally after a system message equal to the
  agent's own ``system_prompt``) and ``n == 1`` goes through ``Agent.answer``: the learning loop (System 1,
  routing, System 2, the buffer). Any other shape (several turns, an assistant message, ``n > 1``, a system
  message of the caller's own) goes to ``Agent.complete``: plain System 1 with the serving adapter, nothing
  routed, nothing learned. A foreign system message is not sent through the loop because ``Agent.answer``
  serves and trains System 1 under one system prompt; dropping the caller's instruction silently would
  answer a different question.
- ``POST /v1/completions`` (a raw prompt, no chat template) is plain System 1 too.
- The model name picks nothing: every name in ``GET /v1/models`` (the base model, the serving adapters)
  and ``"default"`` are served by the agent with whatever adapter serves at that moment.
- ``s2agent`` in the request body (``extra_body`` in the OpenAI client) sets ``route``
  (``auto`` | ``system1`` | ``system2``), ``method`` (a System 2 method) and ``tag``; every response carries
  ``s2agent``: route, confidence, method, adapter_version, accepted, votes, interaction_id, tag.
- ``usage.completion_tokens`` counts every token generated for the answer; the System 2 share is
  ``usage.completion_tokens_details.reasoning_tokens``.
- ``GET /healthz`` (alive), ``GET /readyz`` (model loaded and store answering), ``GET /metrics``
  (Prometheus), and ``/admin/*`` (consolidate, adapters, rollback, stats) behind ``server.admin_token``.

Model calls block, so they run in worker threads: concurrent requests reach the backend's micro-batcher
together and share forward passes.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import json
import logging
import re
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence, TypeVar

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import __version__
from agent.backends import Completion, PromptTooLongError, SamplingParams
from agent.config import ConfigError, ServerConfig
from agent.loop import Agent, Answer, InvalidQueryError
from agent.metrics import Metrics, store_snapshot
from store import StoreError

logger = logging.getLogger(__name__)

STATS_CACHE_SECONDS = 5.0
"""How long ``/metrics`` reuses the store's numbers before asking again."""
READY_TIMEOUT_SECONDS = 2.0
"""A store that takes longer than this to count the buffer makes ``/readyz`` answer 503."""
T = TypeVar("T")
_STARTED = int(time.time())


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


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    param = ".".join(parts) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value" if first["type"] != "missing" else "missing")


@contextmanager
def _agent_errors(prompt_param: str) -> Iterator[None]:
    """Translate what the agent raises for bad input into 4xx; anything else is a 500 (logged with traceback)."""
    try:
        yield
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None
    except InvalidQueryError as exc:
        raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from None
    except ConfigError as exc:  # e.g. an unknown System 2 method named in s2agent.method
        raise APIError(400, str(exc), param="s2agent", code="invalid_value") from None


# --- request bodies ------------------------------------------------------------------------------------------
class _Body(BaseModel):
    # OpenAI has many optional fields this server does not implement; unknown ones are ignored, the few that
    # would change the meaning of the answer are refused in _refuse_unsupported.
    model_config = ConfigDict(extra="ignore")


class S2AgentOptions(_Body):
    model_config = ConfigDict(extra="forbid")
    route: Literal["auto", "system1", "system2"] = "auto"
    method: str | None = None
    tag: str | None = None


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


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = None
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    s2agent: S2AgentOptions = Field(default_factory=S2AgentOptions)

    @property
    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class RollbackRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    version: int | None = None
    """The version to serve again; None: the serving adapter's parent; 0: the base model."""
    scope: str | None = None


def _refuse_unsupported(data: dict[str, Any], fields: Sequence[str]) -> None:
    """Refuse the OpenAI options that would change what the answer means if silently ignored."""
    for name in fields:
        value = data.get(name)
        if name == "response_format" and isinstance(value, dict) and value.get("type", "text") == "text":
            continue
        if name == "best_of" and value == 1:
            continue
        if value:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (declared or streamed), 400 for anything malformed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Content-Length is not a number", code="invalid_body")
        if int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_body") from None
    if not text.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_body")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_body")
    return data


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _validation_error(exc) from None


# --- formatting ----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Reports, ORM rows, dataclasses, datetimes and enums as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "__table__"):  # a store row
        return {c.key: _jsonable(getattr(value, c.key)) for c in value.__table__.columns}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def adapter_model_id(model_name: str, version: int) -> str:
    return f"{model_name}:adapter-v{version}"


def _served_model(agent: Agent, version: int | None) -> str:
    return adapter_model_id(agent.model_name, version) if version else agent.model_name


def _s2agent_extra(answer: Answer | None, version: int | None, tag: str | None = None) -> dict[str, Any]:
    if answer is None:  # plain System 1 completion, served under the request's tag
        return {"route": "system1", "confidence": None, "method": None, "adapter_version": version,
                "accepted": None, "votes": None, "interaction_id": None, "tag": tag}
    return {"route": answer.route, "confidence": answer.confidence, "method": answer.method,
            "adapter_version": answer.adapter_version, "accepted": answer.accepted, "votes": answer.votes,
            "interaction_id": answer.interaction_id, "tag": answer.tag}


@dataclasses.dataclass
class _Result:
    """What one request produced, whichever Agent method made it."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    version: int | None
    extra: dict[str, Any]

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}


def _from_answer(answer: Answer) -> _Result:
    return _Result([answer.text], [answer.finish_reason], answer.prompt_tokens, answer.tokens,
                   answer.tokens_system2, answer.adapter_version, _s2agent_extra(answer, answer.adapter_version))


def _from_completions(completions: list[Completion], version: int | None, tag: str | None) -> _Result:
    return _Result([c.text for c in completions], [c.finish_reason for c in completions],
                   completions[0].prompt_tokens if completions else 0, sum(c.num_tokens for c in completions), 0,
                   version, _s2agent_extra(None, version, tag))


def _pieces(text: str) -> list[str]:
    """Split a finished text into word-sized pieces whose concatenation is the text."""
    return re.findall(r"\s*\S+|\s+", text)


# --- the app -------------------------------------------------------------------------------------------------
class _AccessLog:
    """Pure ASGI middleware: one log line and the HTTP metrics per request; a 500 for any unexpected error.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that streamed responses are timed to their last byte and a
    client that goes away mid-stream is noticed without an exception.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"status": 500, "started": False, "finished": False, "gone": False}

        async def receive_wrapper() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["finished"]:
                state["gone"] = True  # the client hung up before the response was complete
            return message

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:  # noqa: BLE001 - the server keeps serving; the client gets a 500 with a body
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not state["started"]:
                response = JSONResponse(error_body("internal server error; see the server log", "server_error"),
                                        status_code=500)
                await response(scope, receive, send_wrapper)
            state["status"] = 500
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        seconds = time.perf_counter() - started
        self.metrics.observe_request(scope["method"], template, state["status"], seconds)
        agent_route = scope.get("state", {}).get("s2agent_route", "-")
        note = " (client disconnected)" if state["gone"] else ""
        logger.info("%s %s %d route=%s %.1fms%s", scope["method"], scope["path"], state["status"], agent_route,
                    seconds * 1000, note)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown paths and wrong methods, in OpenAI's error shape."""
    assert isinstance(exc, StarletteHTTPException)
    return _error_response(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                                    else None, headers=getattr(exc, "headers", None)))


async def _on_request_validation(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI answers bad path or query parameters with 422; OpenAI clients expect 400 with an error body."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"]) or None
    return _error_response(APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param))


class _StoreCache:
    """``store_snapshot`` at most every ``STATS_CACHE_SECONDS``; None while the store does not answer."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._at = -1e9
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            if time.monotonic() - self._at > STATS_CACHE_SECONDS:
                try:
                    self._value = store_snapshot(self.agent)
                except Exception as exc:  # noqa: BLE001 - metrics must render even when the store is down
                    logger.warning("metrics: the store did not answer: %s", exc)
                    self._value = None
                self._at = time.monotonic()
            return self._value


def create_app(agent: Agent, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``agent``; ``config`` defaults to ``agent.config.server``."""
    config = config or agent.config.server
    metrics = Metrics()
    store_cache = _StoreCache(agent)
    app = FastAPI(title="s2agent", summary="An OpenAI-compatible agent that distils System 2 into System 1.",
                  version=__version__)
    app.state.agent, app.state.metrics, app.state.config = agent, metrics, config
    app.add_middleware(_AccessLog, metrics=metrics)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation)

    # --- helpers that need the agent ---------------------------------------------------------------------
    async def call(prompt_param: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Agent call in a worker thread (the event loop keeps serving meanwhile)."""
        with _agent_errors(prompt_param):
            return await run_in_threadpool(fn, *args, **kwargs)

    def known_models() -> set[str]:
        names = {agent.model_name, "default"}
        names.update(adapter_model_id(agent.model_name, a.version) for a in agent.store.list_adapters() if a.serving)
        return names

    async def check_model(name: str) -> None:
        if name in (agent.model_name, "default"):
            return
        if name not in await run_in_threadpool(known_models):
            raise APIError(404, f"The model {name!r} does not exist; GET /v1/models lists the models served here",
                           param="model", code="model_not_found")

    def check_max_tokens(value: int | None, param: str) -> None:
        if value is not None and not 1 <= value <= config.max_tokens_limit:
            raise APIError(400, f"{param} must be between 1 and {config.max_tokens_limit}, got {value}",
                           param=param, code="invalid_value")

    def sampling(body: _Sampling, max_tokens: int | None) -> SamplingParams:
        fields: dict[str, Any] = {"n": body.n, "stop": body.stops, "seed": body.seed,
                                  "max_new_tokens": max_tokens or agent.config.max_new_tokens}
        if body.temperature is not None:
            fields["temperature"] = body.temperature
        if body.top_p is not None:
            fields["top_p"] = body.top_p
        return SamplingParams(**fields)

    def respond(request: Request, body: _Sampling, result: _Result, *, chat: bool) -> Any:
        request.state.s2agent_route = result.extra["route"]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), _served_model(agent, result.version)
        if body.stream:
            return StreamingResponse(_stream(rid, created, model, body, result, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": result.usage(), "s2agent": result.extra}

    # --- OpenAI routes -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        data = await _read_json(request, config.max_body_bytes)
        _refuse_unsupported(data, ("tools", "functions", "logprobs", "response_format"))
        body: ChatCompletionRequest = _parse(ChatCompletionRequest, data)
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them",
                           param="max_completion_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_max_tokens(max_tokens, "max_completion_tokens" if body.max_completion_tokens is not None
                         else "max_tokens")
        await check_model(body.model)
        messages = body.messages
        first = messages[0]
        own_system = (first.role in ("system", "developer") and agent.config.system_prompt is not None
                      and first.text == agent.config.system_prompt)
        single_turn = messages[-1].role == "user" and (len(messages) == 1 or (len(messages) == 2 and own_system))
        opts = body.s2agent
        if single_turn and body.n == 1:
            kwargs: dict[str, Any] = {"route": opts.route, "method": opts.method, "tag": opts.tag,
                                      "max_new_tokens": max_tokens, "stop": body.stops, "seed": body.seed}
            if body.temperature is not None:
                kwargs["temperature"] = body.temperature
            if body.top_p is not None:
                kwargs["top_p"] = body.top_p
            answer: Answer = await call("messages", agent.answer, messages[-1].text, **kwargs)
            metrics.observe_answer(answer.route, answer.latency_ms / 1000, answer.tokens_system1,
                                   answer.tokens_system2, answer.accepted if answer.route == "system2" else None)
            result = _from_answer(answer)
        else:
            if opts.route == "system2":
                raise APIError(400, "s2agent.route 'system2' needs a single-turn request (one user message) with n=1",
                               param="s2agent.route")
            chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
            completions, version = await call("messages", agent.complete, chat, sampling(body, max_tokens), opts.tag)
            metrics.observe_completion(sum(c.num_tokens for c in completions))
            result = _from_completions(completions, version, opts.tag)
        return respond(request, body, result, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        data = await _read_json(request, config.max_body_bytes)
        _refuse_unsupported(data, ("echo", "logprobs", "suffix", "best_of"))
        body: CompletionRequest = _parse(CompletionRequest, data)
        check_max_tokens(body.max_tokens, "max_tokens")
        await check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        if body.s2agent.route == "system2":
            raise APIError(400, "s2agent.route 'system2' is only for chat completions", param="s2agent.route")
        params = sampling(body, body.max_tokens)
        # Agent.complete takes any backend prompt; a plain string goes to the model untemplated. Several
        # prompts run concurrently so they share the batcher's forward passes.
        outs: list[Any] = [None] * len(prompts)

        async def one(i: int, prompt: str) -> None:
            outs[i] = await call("prompt", agent.complete, prompt, params, body.s2agent.tag)

        async with anyio.create_task_group() as group:
            for i, prompt in enumerate(prompts):
                group.start_soon(one, i, prompt)
        completions_ = [c for out in outs for c in out[0]]
        metrics.observe_completion(sum(c.num_tokens for c in completions_))
        result = _from_completions(completions_, outs[0][1], body.s2agent.tag)
        result.prompt_tokens = sum(out[0][0].prompt_tokens for out in outs if out[0])
        return respond(request, body, result, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        adapters = await run_in_threadpool(agent.store.list_adapters)
        data = [{"id": agent.model_name, "object": "model", "created": _STARTED, "owned_by": "s2agent",
                 "s2agent": {"kind": "base", "serving_adapter": agent.serving_version(None)}}]
        for row in adapters:
            if not row.serving:
                continue
            when = row.promoted_at or row.created_at
            data.append({"id": adapter_model_id(agent.model_name, row.version), "object": "model",
                         "created": int(when.timestamp()) if when else _STARTED, "owned_by": "s2agent",
                         "parent": agent.model_name, "root": agent.model_name,
                         "s2agent": {"kind": "adapter", "version": row.version, "scope": row.scope,
                                     "parent": row.parent, "status": row.status, "n_train": row.n_train,
                                     "metrics": _jsonable(row.metrics),
                                     "loaded": agent.serving_version(row.scope) == row.version}})
        return {"object": "list", "data": data}

    # --- operations --------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        try:
            with anyio.fail_after(READY_TIMEOUT_SECONDS):
                pending = await anyio.to_thread.run_sync(agent.store.count_examples, abandon_on_cancel=True)
        except TimeoutError:
            return JSONResponse(error_body(f"the store did not answer within {READY_TIMEOUT_SECONDS:g} s",
                                           "service_unavailable", code="store_unreachable"), status_code=503)
        except Exception as exc:  # noqa: BLE001 - any store failure means "not ready"
            return JSONResponse(error_body(f"the store is unreachable: {exc}", "service_unavailable",
                                           code="store_unreachable"), status_code=503)
        return {"status": "ready", "model": agent.model_name, "adapter_version": agent.serving_version(None),
                "examples": pending}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        snapshot = await run_in_threadpool(store_cache.get)
        text = metrics.render(snapshot, agent.background_stats())  # background System 2 counters: live, not cached
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # --- admin -------------------------------------------------------------------------------------------
    def require_admin(request: Request) -> None:
        if not config.admin_token:
            raise APIError(403, "admin routes are disabled: set server.admin_token or S2AGENT_ADMIN_TOKEN",
                           type="permission_error", code="admin_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "admin routes need 'Authorization: Bearer <token>'", type="authentication_error",
                           code="missing_token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
            raise APIError(403, "the admin token is wrong", type="permission_error", code="invalid_token")

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @admin.post("/consolidate")
    async def consolidate() -> Any:
        # Training takes minutes: a worker thread, never the event loop; requests keep being served meanwhile.
        report = await anyio.to_thread.run_sync(agent.consolidate)
        return _jsonable(report)

    @admin.get("/adapters")
    async def adapters() -> Any:
        rows = await run_in_threadpool(agent.store.list_adapters)
        return {"object": "list", "data": _jsonable(rows)}

    @admin.post("/rollback")
    async def rollback(request: Request) -> Any:
        body: RollbackRequest = _parse(RollbackRequest, await _read_json(request, config.max_body_bytes))

        def run() -> Any:
            row = agent.store.rollback(body.version, scope=body.scope)
            agent.refresh_adapters(force=True)
            return row

        try:
            row = await run_in_threadpool(run)
        except StoreError as exc:
            raise APIError(409, str(exc), param="version", code="rollback_refused") from None
        return {"serving": _jsonable(row), "adapter_version": agent.serving_version(body.scope)}

    @admin.get("/stats")
    async def stats() -> Any:
        return _jsonable(await run_in_threadpool(agent.store.stats))

    app.include_router(admin)

    return app


async def _stream(rid: str, created: int, model: str, body: _Sampling, result: _Result, chat: bool
                  ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

    The engine does not stream tokens yet: the text is complete before the first event, and is sent in
    word-sized pieces so that streaming clients work unchanged (they just see it arrive all at once).
    """
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def choice(i: int, content: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": i, "text": content or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    usage = body.stream_options is not None and body.stream_options.include_usage
    for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
        if chat:
            yield event([choice(i, "", None, role=True)])
        for piece in _pieces(text):
            yield event([choice(i, piece, None)])
        yield event([choice(i, None, reason)], s2agent=result.extra)
    if usage:
        yield event([], usage=result.usage())
    yield "data: [DONE]\n\n"


# --- running it ----------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn's server minus one habit: after a graceful shutdown uvicorn re-raises the SIGTERM/SIGINT it
    caught, which would kill the process before ``agent.close()`` runs, and exit non-zero. Here the signal
    only starts the graceful shutdown, and :func:`serve` returns normally afterwards."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(agent: Agent, host: str | None = None, port: int | None = None, *, config: ServerConfig | None = None,
          timeout_graceful_shutdown: float = 30.0, log_level: str = "info") -> None:
    """Serve ``agent`` until SIGTERM or SIGINT, then shut down cleanly and return.

    On a signal uvicorn stops accepting connections and lets requests in flight finish (for up to
    ``timeout_graceful_shutdown`` seconds); then ``agent.close()`` stops the scheduler and flushes the store.
    The serving adapter and the buffer live in the store, so a restart resumes where this one stopped.
    """
    config = config or agent.config.server
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = _Server(uvicorn.Config(
        create_app(agent, config), host=host or config.host, port=port or config.port, log_level=log_level,
        access_log=False,  # our own line per request (with the agent route) replaces uvicorn's
        timeout_graceful_shutdown=timeout_graceful_shutdown, lifespan="off",
    ))
    try:
        server.run()
    finally:
        logger.info("server stopped; closing the agent")
        agent.close()


