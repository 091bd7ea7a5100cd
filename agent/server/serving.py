"""Serving logic between the routes and the :class:`~agent.loop.Agent`: no routes, no request parsing.

A request's sampling fields become :class:`~agent.backends.SamplingParams` or ``Agent.answer`` options;
an :class:`~agent.loop.Answer` or a list of completions becomes a :class:`Result`, which becomes OpenAI's
response object or its server-sent events. Blocking agent calls run in worker threads through
:func:`call`, which also turns what the agent raises into the HTTP error a client gets.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import re
import threading
import time
from datetime import datetime
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.concurrency import run_in_threadpool

from agent.backends import Completion, SamplingParams
from agent.errors import EXPECTED
from agent.loop import Agent, Answer
from agent.metrics import store_snapshot
from agent.server.errors import api_error
from agent.server.protocol import APIError, SamplingRequest, error_body

logger = logging.getLogger(__name__)

STATS_CACHE_SECONDS = 5.0
"""How long ``/metrics`` reuses the store's numbers before asking again."""
STARTED = int(time.time())
"""When this process started: the ``created`` time of models that have no date of their own."""
T = TypeVar("T")


async def call(operation: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking Agent call in a worker thread (the event loop keeps serving meanwhile).

    What the runtime raises becomes the client's error, as :data:`agent.server.errors.ERRORS` says for
    ``operation`` (``chat``, ``completion``, ``rollback``; None for one without rows of its own)."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except EXPECTED as exc:
        raise api_error(exc, operation) from None


# --- models --------------------------------------------------------------------------------------------------
def adapter_model_id(model_name: str, version: int) -> str:
    """The model name an adapter is listed (and may be asked for) under: ``<base>:adapter-v<version>``."""
    return f"{model_name}:adapter-v{version}"


def served_model(agent: Agent, version: int | None) -> str:
    return adapter_model_id(agent.model_name, version) if version else agent.model_name


def known_models(agent: Agent) -> set[str]:
    """Every name a request may ask for: the base model and the adapters this process serves now (blocking:
    reads the registry). A version the registry names but that failed to load here is not one of them."""
    served = agent.serving_adapters()
    names = {agent.model_name, "default"}
    names.update(adapter_model_id(agent.model_name, a.version) for a in agent.adapters() if served.get(a.scope) == a.version)
    return names


def model_cards(agent: Agent) -> list[dict[str, Any]]:
    """``GET /v1/models``: the base model, then every adapter this process serves (blocking: reads the registry).

    What serves, not what the registry says: an adapter that failed to load is not listed as a model; the
    base card's ``s2agent.adapter_failures`` names it and says what serves its scope instead."""
    agent.refresh_adapters()  # follow a promotion or rollback of another process before saying what serves
    served = agent.serving_adapters()
    base: dict[str, Any] = {"kind": "base", "serving_adapter": agent.serving_version(None)}
    failures = agent.adapter_failures()
    if failures:
        base["adapter_failures"] = failures
    cards = [{"id": agent.model_name, "object": "model", "created": STARTED, "owned_by": "s2agent", "s2agent": base}]
    for row in agent.adapters():
        if served.get(row.scope) != row.version:
            continue
        when = row.promoted_at or row.created_at
        cards.append({"id": adapter_model_id(agent.model_name, row.version), "object": "model",
                      "created": int(when.timestamp()) if when else STARTED, "owned_by": "s2agent",
                      "parent": agent.model_name, "root": agent.model_name,
                      "s2agent": {"kind": "adapter", "version": row.version, "scope": row.scope,
                                  "parent": row.parent, "status": row.status, "n_train": row.n_train,
                                  "metrics": jsonable(row.metrics), "loaded": True,
                                  "registry_serving": row.serving}})
    return cards


def adapter_rows(agent: Agent) -> dict[str, Any]:
    """``GET /admin/adapters``: every registry row, each with whether this process serves it (``loaded``) and
    why not when the registry says it serves (``load_error``); then what serves per scope (blocking)."""
    agent.refresh_adapters()
    served = agent.serving_adapters()
    failures = agent.adapter_failures()
    errors = {(f["scope"], f["version"]): f["error"] for f in failures}
    data = [{**jsonable(row), "loaded": served.get(row.scope) == row.version,
             "load_error": errors.get((row.scope, row.version))} for row in agent.adapters()]
    return {"object": "list", "data": data,
            "serving": {scope or "general": version for scope, version in served.items()},
            "adapter_failures": failures}


# --- requests ------------------------------------------------------------------------------------------------
SAMPLED_TEMPERATURE = 1.0
"""The temperature of a request for ``n > 1`` samples that names none: OpenAI's default. With ``n = 1`` an
absent temperature means greedy decoding, the System 1 pass the router's confidence is calibrated on."""


def adapter_version_of(agent: Agent, model: str) -> int | None:
    """The adapter version a request's ``model`` names (``<base>:adapter-v<N>``, as /v1/models lists it);
    None for the base model's name or ``default``: the adapter serving the request's tag."""
    prefix = adapter_model_id(agent.model_name, 0)[:-1]
    tail = model[len(prefix):] if model.startswith(prefix) else ""
    return int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 9 else None


def shaping(body: SamplingRequest) -> dict[str, Any]:
    """Log-probs, penalties and biases of a request, as ``SamplingParams`` fields (and ``Agent.answer`` options)."""
    return {"top_logprobs": body.top_logprobs_wanted, "presence_penalty": body.presence_penalty or 0.0,
            "frequency_penalty": body.frequency_penalty or 0.0, "logit_bias": body.biases}


def sampling_params(body: SamplingRequest, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
    """The sampling of a plain System 1 completion; unset fields keep the backend's defaults, except that
    ``n > 1`` samples at :data:`SAMPLED_TEMPERATURE` when no temperature is given."""
    fields: dict[str, Any] = {"n": body.n, "stop": body.stops, "seed": body.seed,
                              "max_new_tokens": max_tokens or default_max_tokens, **shaping(body)}
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    elif body.n > 1:
        fields["temperature"] = SAMPLED_TEMPERATURE
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    return SamplingParams(**fields)


def answer_options(body: SamplingRequest, max_tokens: int | None) -> dict[str, Any]:
    """The keyword arguments of ``Agent.answer`` for a request; unset fields keep its defaults."""
    opts = body.s2agent
    kwargs: dict[str, Any] = {"route": opts.route, "method": opts.method, "tag": opts.tag,
                              "max_new_tokens": max_tokens, "stop": body.stops, "seed": body.seed, **shaping(body)}
    if body.temperature is not None:
        kwargs["temperature"] = body.temperature
    if body.top_p is not None:
        kwargs["top_p"] = body.top_p
    return kwargs


# --- results -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """What one request produced, whichever Agent method made it."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    version: int | None
    extra: dict[str, Any]
    """The response's ``s2agent`` field."""
    logprobs: list[Completion | None] | None = None
    """Per choice, the completion whose tokens and log-probs the response reports; None: none asked for."""

    @classmethod
    def of_answer(cls, answer: Answer) -> Result:
        extra = {"route": answer.route, "confidence": answer.confidence, "method": answer.method,
                 "adapter_version": answer.adapter_version, "accepted": answer.accepted, "votes": answer.votes,
                 "interaction_id": answer.interaction_id, "tag": answer.tag}
        if "teacher" in answer.route_reason:  # System 2 ran on the teacher (its tokens), or was kept off it
            extra["teacher"] = answer.route_reason["teacher"]
        if "system2" in answer.route_reason:  # routed to System 2 but "skipped" (memory), "queued" or "dropped"
            extra["system2"] = answer.route_reason["system2"]
        # Log-probs describe System 1's tokens: reported when System 1's text is the answer, null for System 2's.
        s1 = answer.system1
        detail = [s1 if s1 is not None and s1.tokens is not None and answer.route == "system1" else None]
        return cls([answer.text], [answer.finish_reason], answer.prompt_tokens, answer.tokens,
                   answer.tokens_system2, answer.adapter_version, extra, detail)

    @classmethod
    def of_completions(cls, completions: list[Completion], version: int | None, tag: str | None) -> Result:
        """Plain System 1 completions, served under the request's tag; nothing routed or learned."""
        extra = {"route": "system1", "confidence": None, "method": None, "adapter_version": version,
                 "accepted": None, "votes": None, "interaction_id": None, "tag": tag}
        detail: list[Completion | None] = [c if c.tokens is not None else None for c in completions]
        return cls([c.text for c in completions], [c.finish_reason for c in completions],
                   completions[0].prompt_tokens if completions else 0, sum(c.num_tokens for c in completions), 0,
                   version, extra, detail)

    def route_note(self) -> str:
        """For the access log line: the route, and the System 2 method that ran or why none did, e.g.
        ``system2 method=pal``, ``system1 method=pal`` (it gave no accepted answer), ``system1 system2=skipped``."""
        note = str(self.extra["route"])
        if self.extra.get("method"):
            note += f" method={self.extra['method']}"
        if self.extra.get("system2"):
            note += f" system2={self.extra['system2']}"
        return note

    def logprobs_of(self, i: int, chat: bool) -> dict[str, Any] | None:
        c = self.logprobs[i] if self.logprobs and i < len(self.logprobs) else None
        return logprobs_body(c, chat) if c is not None else None

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}


def response_body(rid: str, created: int, model: str, result: Result, chat: bool) -> dict[str, Any]:
    """A ``chat.completion`` or ``text_completion`` object."""
    pairs = enumerate(zip(result.texts, result.finish_reasons))
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": result.logprobs_of(i, chat), "finish_reason": reason} for i, (text, reason) in pairs]
    else:
        choices = [{"index": i, "text": text, "logprobs": result.logprobs_of(i, chat), "finish_reason": reason}
                   for i, (text, reason) in pairs]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": result.usage(), "s2agent": result.extra}


def logprobs_body(c: Completion, chat: bool) -> dict[str, Any]:
    """A choice's ``logprobs`` in OpenAI's shape: chat's ``content`` list, or completions' parallel lists."""
    tokens, top = c.tokens or [], c.top_logprobs or [[] for _ in c.token_ids]
    if chat:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                            for t, lp, alts in zip(tokens, c.logprobs, top)], "refusal": None}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": c.logprobs[:len(tokens)],
            "top_logprobs": [dict(alts) for alts in top] if any(top) else None, "text_offset": offsets}


def _pieces(text: str) -> list[str]:
    """Split a finished text into word-sized pieces whose concatenation is the text."""
    return re.findall(r"\s*\S+|\s+", text)


async def stream_events(rid: str, created: int, model: str, result: Result, chat: bool, include_usage: bool
                        ) -> AsyncIterator[str]:
    """Server-sent events of a finished ``result``, ending with ``data: [DONE]``: what a streamed request of
    several prompts gets (its text is complete before the first event, sent in word-sized pieces).
    Single answers stream token by token through :mod:`agent.server.live`."""

    chunk = Chunks(rid, created, model, chat)
    for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
        if chat:
            yield chunk.start(i)
        for piece in _pieces(text):
            yield chunk.text(i, piece)
        yield chunk.finish(i, reason, result)
    yield from_end(chunk, result, include_usage)


def from_end(chunk: Chunks, result: Result, include_usage: bool) -> str:
    """The usage event (when asked for) and ``[DONE]``."""
    return (chunk.usage(result) if include_usage else "") + "data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Server-sent events of one response in OpenAI's chunk format (``chat.completion.chunk`` or
    ``text_completion``)."""

    rid: str
    created: int
    model: str
    chat: bool

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def _choice(self, i: int, content: str | None, finish: str | None, role: bool = False,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.chat:
            return {"index": i, "text": content or "", "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def start(self, i: int) -> str:
        """Chat's first chunk of a choice: the assistant role, no text yet."""
        return self.event([self._choice(i, "", None, role=True)])

    def text(self, i: int, piece: str) -> str:
        return self.event([self._choice(i, piece, None)])

    def finish(self, i: int, reason: str, result: Result) -> str:
        """A choice's last chunk: its finish reason, its log-probs when asked for, the ``s2agent`` field."""
        return self.event([self._choice(i, None, reason, logprobs=result.logprobs_of(i, self.chat))],
                          s2agent=result.extra)

    def usage(self, result: Result) -> str:
        return self.event([], usage=result.usage())

    def error(self, exc: APIError) -> str:
        return f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"


# --- reports -------------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Reports, ORM rows, dataclasses, datetimes and enums as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "__table__"):  # a store row
        return {c.key: jsonable(getattr(value, c.key)) for c in value.__table__.columns}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class StatsCache:
    """``store_snapshot`` at most every ``STATS_CACHE_SECONDS``; None while the store does not answer."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._at = -1e9
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        """The snapshot (blocking when it is stale: a few store queries)."""
        with self._lock:
            if time.monotonic() - self._at > STATS_CACHE_SECONDS:
                try:
                    self._value = store_snapshot(self.agent)
                except Exception as exc:  # noqa: BLE001 - metrics must render even when the store is down
                    logger.warning("metrics: the store did not answer: %s", exc)
                    self._value = None
                self._at = time.monotonic()
            return self._value
