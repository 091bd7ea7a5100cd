"""The HTTP routes: OpenAI's (``/v1``), the operator's (health, readiness, metrics) and ``/admin``.

The routers are module-level; a handler finds the agent, its metrics and the server config on
``request.app.state`` (set by :func:`agent.server.app.create_app`). A handler parses, validates, calls the
agent (in a worker thread, through :func:`~agent.server.serving.call`) and formats; it decides nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agent.config import ServerConfig
from agent.loop import Agent
from agent.metrics import Metrics
from agent.server.limits import Admission, check_size, chunks
from agent.server.errors import rule_for
from agent.server.auth import authenticate, caller_of, require_admin, require_steer
from agent.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RollbackRequest,
    SamplingRequest,
    client_gone,
    error_body,
    parse,
    read_json,
    refuse_unsupported,
)
from agent.server.live import LiveCall, call_unless_gone, events
from agent.server.serving import (
    Chunks,
    Result,
    adapter_version_of,
    StatsCache,
    adapter_rows,
    answer_options,
    call,
    jsonable,
    known_models,
    model_cards,
    response_body,
    sampling_params,
    served_model,
    stream_events,
)
from store import StoreUnavailable

READY_TIMEOUT_SECONDS = 2.0
"""A store that takes longer than this to count the buffer makes ``/readyz`` answer 503."""


def _agent(request: Request) -> Agent:
    return request.app.state.agent


def _config(request: Request) -> ServerConfig:
    return request.app.state.config


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _admission(request: Request) -> Admission:
    return request.app.state.admission


async def _body(request: Request) -> dict[str, Any]:
    config = _config(request)
    return await read_json(request, config.max_body_bytes, config.read_timeout_s)


async def _still_there(request: Request, what: str) -> None:
    """Stop here if the client hung up: what it asked for would be generated for nobody."""
    if await request.is_disconnected():
        raise client_gone(what)


# --- checks --------------------------------------------------------------------------------------------------
async def _check_model(agent: Agent, name: str) -> int | None:
    """The adapter version ``name`` asks for (None: the base name or ``default``, whatever serves the tag);
    404 for a name /v1/models does not list."""
    if name in (agent.model_name, "default"):
        return None
    if name not in await call(None, known_models, agent):
        raise APIError(404, f"The model {name!r} does not exist; GET /v1/models lists the models served here",
                       param="model", code="model_not_found")
    return adapter_version_of(agent, name)


def _check_max_tokens(config: ServerConfig, value: int | None, param: str) -> None:
    if value is not None and not 1 <= value <= config.max_tokens_limit:
        raise APIError(400, f"{param} must be between 1 and {config.max_tokens_limit}, got {value}",
                       param=param, code="invalid_value")


def _respond(request: Request, body: SamplingRequest, result: Result, *, chat: bool) -> Any:
    request.state.s2agent_route = result.route_note()  # for the access log line
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), served_model(_agent(request), result.version)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream_events(rid, created, model, result, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return response_body(rid, created, model, result, chat)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _stream_live(request: Request, body: SamplingRequest, version: int | None, *, chat: bool, operation: str,
                       fn: Any, args: tuple, kwargs: dict[str, Any], feed: str, choices: int,
                       result_of: Any) -> StreamingResponse:
    """Stream a generation as it decodes (:mod:`agent.server.live`); the admission slot is held until it ends."""
    admission = _admission(request)
    admission.acquire()
    live = LiveCall(operation, fn, *args, feed=feed, on_done=admission.release, **kwargs)
    try:
        first = await live.first(request)
    except BaseException:
        live.abandon()
        raise
    agent = _agent(request)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    # The model is named before the answer exists: the adapter asked for, else the one serving the tag now.
    model = served_model(agent, version if version is not None else agent.serving_version(body.s2agent.tag))

    def finished(value: Any) -> Result:
        result = result_of(value)
        request.state.s2agent_route = result.route_note()
        return result

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(events(live, first, Chunks(rid, int(time.time()), model, chat), choices, include_usage,
                                    finished, request), media_type="text/event-stream", headers=_SSE_HEADERS)


# --- OpenAI routes -------------------------------------------------------------------------------------------
openai = APIRouter(dependencies=[Depends(authenticate)])  # an API key with the answer right, when keys are set


@openai.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    agent, config, metrics = _agent(request), _config(request), _metrics(request)
    data = await _body(request)
    refuse_unsupported(data, ("tools", "functions", "response_format"))
    body = parse(ChatCompletionRequest, data)
    check_size(config, 1, body.n)
    caller = caller_of(request)
    require_steer(caller, body.s2agent)
    if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them",
                       param="max_completion_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _check_max_tokens(config, max_tokens, "max_completion_tokens" if body.max_completion_tokens is not None
                      else "max_tokens")
    version = await _check_model(agent, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    query = agent.learnable_query(messages, body.n)
    if query is None and body.s2agent.route == "system2":
        raise APIError(400, "s2agent.route 'system2' needs a single-turn request (one user message) with n=1",
                       param="s2agent.route")
    if body.stream:
        await _still_there(request, "before its answer was generated")
        if query is not None:
            def answered(answer: Any) -> Result:
                metrics.observe_answer(answer.route, answer.latency_ms / 1000, answer.tokens_system1,
                                       answer.tokens_system2, answer.accepted if answer.route == "system2" else None)
                return Result.of_answer(answer)

            return await _stream_live(
                request, body, version, chat=True, operation="chat", fn=agent.answer, args=(query,),
                kwargs=dict(source=caller.source, teach=caller.may("teach"), adapter_version=version,
                            **answer_options(body, max_tokens)),
                feed="on_text", choices=1, result_of=answered)
        params = sampling_params(body, max_tokens, agent.config.max_new_tokens)

        def completed(out: Any) -> Result:
            metrics.observe_completion(sum(c.num_tokens for c in out[0]))
            return Result.of_completions(out[0], out[1], body.s2agent.tag)

        return await _stream_live(request, body, version, chat=True, operation="chat", fn=agent.complete,
                                  args=(messages, params, body.s2agent.tag), kwargs=dict(adapter_version=version),
                                  feed="on_delta", choices=body.n, result_of=completed)
    with _admission(request).slot():
        await _still_there(request, "before its answer was generated")
        if query is not None:
            answer = await call_unless_gone(request, "chat", agent.answer, query, source=caller.source,
                                            teach=caller.may("teach"), adapter_version=version,
                                            **answer_options(body, max_tokens))
            metrics.observe_answer(answer.route, answer.latency_ms / 1000, answer.tokens_system1,
                                   answer.tokens_system2, answer.accepted if answer.route == "system2" else None)
            result = Result.of_answer(answer)
        else:
            params = sampling_params(body, max_tokens, agent.config.max_new_tokens)
            completions, version = await call_unless_gone(request, "chat", agent.complete, messages, params,
                                                          body.s2agent.tag, adapter_version=version)
            metrics.observe_completion(sum(c.num_tokens for c in completions))
            result = Result.of_completions(completions, version, body.s2agent.tag)
    return _respond(request, body, result, chat=True)


@openai.post("/v1/completions")
async def completions(request: Request) -> Any:
    agent, config, metrics = _agent(request), _config(request), _metrics(request)
    data = await _body(request)
    refuse_unsupported(data, ("echo", "suffix", "best_of"))
    body = parse(CompletionRequest, data)
    require_steer(caller_of(request), body.s2agent)
    _check_max_tokens(config, body.max_tokens, "max_tokens")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_size(config, len(prompts), body.n)
    version = await _check_model(agent, body.model)
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    if body.s2agent.route == "system2":
        raise APIError(400, "s2agent.route 'system2' is only for chat completions", param="s2agent.route")
    params = sampling_params(body, body.max_tokens, agent.config.max_new_tokens)
    if body.stream and len(prompts) == 1:  # one prompt streams as it decodes; several are sent when all are done
        await _still_there(request, "before its answer was generated")

        def completed(out: Any) -> Result:
            metrics.observe_completion(sum(c.num_tokens for c in out[0]))
            return Result.of_completions(out[0], out[1], body.s2agent.tag)

        return await _stream_live(request, body, version, chat=False, operation="completion", fn=agent.complete,
                                  args=(prompts[0], params, body.s2agent.tag), kwargs=dict(adapter_version=version),
                                  feed="on_delta", choices=body.n, result_of=completed)
    # Agent.complete takes any backend prompt; a plain string goes to the model untemplated. The prompts of
    # one chunk run concurrently so they share the batcher's forward passes; chunks run one after the other,
    # so a client that hangs up stops its request within one batch, and other requests get every other batch.
    outs: list[Any] = [None] * len(prompts)

    async def one(i: int, prompt: str) -> None:
        outs[i] = await call_unless_gone(request, "completion", agent.complete, prompt, params, body.s2agent.tag,
                                         adapter_version=version)

    with _admission(request).slot():
        done = 0
        for chunk in chunks(prompts, body.n, agent.config.max_batch):
            await _still_there(request, f"after {done} of its {len(prompts)} prompts were generated")
            try:
                async with anyio.create_task_group() as group:
                    for i, prompt in enumerate(chunk, start=done):
                        group.start_soon(one, i, prompt)
            except* APIError as failed:  # the task group wraps what its tasks raise; the client gets the first error
                raise failed.exceptions[0] from None
            done += len(chunk)
    completions_ = [c for out in outs for c in out[0]]
    metrics.observe_completion(sum(c.num_tokens for c in completions_))
    result = Result.of_completions(completions_, outs[0][1], body.s2agent.tag)
    result.prompt_tokens = sum(out[0][0].prompt_tokens for out in outs if out[0])
    return _respond(request, body, result, chat=False)


@openai.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": await call(None, model_cards, _agent(request))}


# --- operations ----------------------------------------------------------------------------------------------
ops = APIRouter()


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz")
async def readyz(request: Request) -> Any:
    agent = _agent(request)
    if agent.store.damaged:  # it refuses every write, so no answer could be logged: not ready, and why
        return JSONResponse(error_body(agent.store.damaged, "service_unavailable", code="store_damaged"),
                            status_code=503)
    try:
        with anyio.fail_after(READY_TIMEOUT_SECONDS):
            pending = await anyio.to_thread.run_sync(agent.pending_examples, abandon_on_cancel=True)
    except TimeoutError:
        return JSONResponse(error_body(f"the store did not answer within {READY_TIMEOUT_SECONDS:g} s",
                                       "service_unavailable", code="store_unreachable"), status_code=503)
    except Exception as exc:  # noqa: BLE001 - any store failure means "not ready"
        # A damaged, full or read-only store says so (store_damaged...): "unreachable" would send the operator
        # looking at the network.
        rule = rule_for(exc) if isinstance(exc, StoreUnavailable) else None
        return JSONResponse(error_body(f"the store cannot answer: {exc}", "service_unavailable",
                                       code=rule.code if rule else "store_unreachable"), status_code=503)
    failures = agent.adapter_failures()  # still serving (the previous adapter or the base model): 200, but said
    return {"status": "degraded" if failures else "ready", "model": agent.model_name,
            "adapter_version": agent.serving_version(None), "pending_examples": pending, "adapter_failures": failures}


@ops.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> PlainTextResponse:
    stats: StatsCache = request.app.state.stats
    snapshot = await run_in_threadpool(stats.get)
    agent = _agent(request)
    background = agent.background_stats()  # background System 2 counters: live, not cached
    failures = len(agent.adapter_failures())  # live too: what this process serves, whatever the store says
    text = _metrics(request).render(snapshot, background, agent.teacher_stats(), failures,
                                    memory=agent.routing_memory.stats())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# --- admin ---------------------------------------------------------------------------------------------------
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@admin.post("/consolidate")
async def consolidate(request: Request) -> Any:
    """A consolidation now, run as the scheduler runs one (in a niced child process by default, so serving keeps
    its cores); the request waits for its report. 409 on a server that only serves, or while one runs."""
    agent = _agent(request)
    if not agent.config.scheduler.enabled:
        raise APIError(409, "this server only serves (--no-train): consolidate where training runs (agent worker, "
                            "agent consolidate)", code="training_disabled")
    scheduler = agent.consolidation_runner()
    busy = APIError(409, "a consolidation is already running in this server; GET /metrics shows it",
                    code="consolidation_running", headers={"Retry-After": "60"})
    if scheduler.running:
        raise busy
    report = await call(None, scheduler.run_now, "admin request")
    if report is None:
        if scheduler.running:  # another request's run began between the check and this one
            raise busy
        raise APIError(500, "the consolidation could not run; see the server log", type="server_error")
    return jsonable(report)


@admin.get("/adapters")
async def adapters(request: Request) -> Any:
    return await call(None, adapter_rows, _agent(request))


@admin.post("/rollback")
async def rollback(request: Request) -> Any:
    agent = _agent(request)
    body = parse(RollbackRequest, await _body(request))
    row = await call("rollback", agent.rollback, body.version, body.scope)
    return {"serving": jsonable(row), "adapter_version": agent.serving_version(body.scope)}


@admin.get("/stats")
async def stats(request: Request) -> Any:
    return jsonable(await call(None, _agent(request).stats))
