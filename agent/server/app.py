"""The FastAPI app around an agent (:func:`create_app`) and the process that serves it (:func:`serve`).

The app holds what the routes read (``app.state``: the agent, its metrics, the server config, the
store's cached numbers), one access-log line per request and the handlers that answer every error in
OpenAI's shape.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import __version__
from agent.auth import KeyRing, check_exposure
from agent.config import ServerConfig
from agent.errors import EXPECTED
from agent.loop import Agent
from agent.metrics import Metrics
from agent.server import routes
from agent.server.connections import uvicorn_options
from agent.server.errors import api_error
from agent.server.limits import Admission
from agent.server.protocol import APIError, error_body
from agent.server.serving import StatsCache

logger = logging.getLogger(__name__)


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
        caller = scope.get("state", {}).get("caller")
        note = (f" source={caller.source}" if caller else "") + (" (client disconnected)" if state["gone"] else "")
        logger.info("%s %s %d route=%s %.1fms%s", scope["method"], scope["path"], state["status"], agent_route,
                    seconds * 1000, note)


# --- errors in OpenAI's shape --------------------------------------------------------------------------------
def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _on_runtime_error(request: Request, exc: Exception) -> JSONResponse:
    """What the runtime raised outside :func:`~agent.server.serving.call`, as :data:`~agent.server.errors.ERRORS`
    says for no operation in particular."""
    return _error_response(api_error(exc))


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


# --- the app -------------------------------------------------------------------------------------------------
def create_app(agent: Agent, config: ServerConfig | None = None, *, worker: bool = False) -> FastAPI:
    """The FastAPI app serving ``agent``; ``config`` defaults to ``agent.config.server``. Its API keys are
    read here (a bad keys file is a :class:`~agent.errors.ConfigError`) and kept as digests only.

    ``worker``: the operator's routes only (health, readiness, metrics), for ``agent worker``, which
    consolidates and answers no one."""
    config = config or agent.config.server
    metrics = Metrics()
    app = FastAPI(title="s2agent", summary="An OpenAI-compatible agent that distils System 2 into System 1.",
                  version=__version__)
    app.state.agent, app.state.metrics, app.state.config = agent, metrics, config
    app.state.stats = StatsCache(agent)
    app.state.admission = Admission(config.max_queued)
    app.state.keys = KeyRing.load(config)
    app.add_middleware(_AccessLog, metrics=metrics)
    app.add_exception_handler(APIError, _on_api_error)
    for root in EXPECTED:
        app.add_exception_handler(root, _on_runtime_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    for router in (routes.ops,) if worker else (routes.openai, routes.ops, routes.admin):
        app.include_router(router)
    return app


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
          timeout_graceful_shutdown: float = 30.0, log_level: str = "info", worker: bool = False) -> None:
    """Serve ``agent`` until SIGTERM or SIGINT, then shut down cleanly and return.

    On a signal uvicorn stops accepting connections and lets requests in flight finish (for up to
    ``timeout_graceful_shutdown`` seconds); then ``agent.close()`` stops the scheduler and flushes the store.
    The serving adapter and the buffer live in the store, so a restart resumes where this one stopped.
    Connections are bounded by :func:`~agent.server.connections.uvicorn_options` (head and keep-alive
    timeouts, a connection limit), requests by :mod:`agent.server.limits`.
    A non-loopback ``host`` without API keys is refused (:func:`agent.auth.check_exposure`) unless
    ``server.allow_unauthenticated``.
    """
    config = config or agent.config.server
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(agent, config, worker=worker)
    check_exposure(host or config.host, app.state.keys, config.allow_unauthenticated)
    server = _Server(uvicorn.Config(
        app, host=host or config.host, port=port or config.port, log_level=log_level,
        access_log=False,  # our own line per request (with the agent route) replaces uvicorn's
        timeout_graceful_shutdown=timeout_graceful_shutdown, lifespan="off", **uvicorn_options(config),
    ))
    try:
        server.run()
    finally:
        logger.info("server stopped; closing the agent")
        agent.close()
