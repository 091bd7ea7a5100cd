"""The server against a hostile client, for real (issue 13: no stalls, bad input): uvicorn on 127.0.0.1 with the
settings ``agent serve`` uses, the tiny llama, a SQLite store, raw sockets where a well-behaved client would
not do what is tested.

Each test is an attack that the server before issue 13 did not survive well: a 500, a stall, a connection
held forever. The assertions are on what happened (statuses, which rows the engine generated, whether a
connection was closed), with generous time bounds only where a wait is the point.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from agent import Agent
from agent.config import ServerConfig
from agent.server import create_app
from agent.server.connections import uvicorn_options
from tests.agent.test_server import ServerThread, ask, assert_error, tiny_agent_config
from tests.conftest import wait_for

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
READ_TIMEOUT_S = 1.5
MAX_BATCH = 16
BIG_TOKENS = 256
"""Tokens per sequence of the big requests: long enough that a batch of them is still running when the
test acts (the tiny model decodes a batch of 16 at a few hundred tokens a second)."""


def server_config(**changes) -> ServerConfig:
    fields = {"admin_token": "secret", "max_tokens_limit": BIG_TOKENS, "read_timeout_s": READ_TIMEOUT_S,
              "keep_alive_s": 1.0, **changes}
    return ServerConfig(**fields)


def start(agent: Agent, config: ServerConfig) -> ServerThread:
    return ServerThread(create_app(agent, config), **uvicorn_options(config))


@pytest.fixture(scope="module")
def agent(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = tiny_agent_config(tiny_model_dir, tmp_path_factory.mktemp("abuse-agent"))
    config.max_batch = MAX_BATCH
    config.server = server_config()  # max_body_bytes: the default 1 MB, room for a 400,000-deep body
    agent = Agent(config)
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def server(agent):
    with start(agent, agent.config.server) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def raw_request(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), extra, body))


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` seconds (whatever it sent first is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# --- no stalls: what one request may ask for -----------------------------------------------------------------
def test_too_many_prompts_or_sequences_are_refused_before_anything_runs(http, agent):
    rows = agent.backend.admitted_rows
    error = assert_error(http.post(COMPLETIONS, json={"model": "default", "prompt": ["Hi"] * 1500, "max_tokens": 1}),
                         400, "invalid_value")
    assert error["param"] == "prompt" and "32" in error["message"]
    error = assert_error(http.post(COMPLETIONS, json={"model": "default", "prompt": ["Hi"] * 32, "n": 3}), 400,
                         "invalid_value")
    assert error["param"] == "n" and "96" in error["message"]
    assert agent.backend.admitted_rows == rows  # nothing was generated for either
    allowed = http.post(COMPLETIONS, json={"model": "default", "prompt": ["Hi", "Yo"], "n": 2, "max_tokens": 1})
    assert allowed.status_code == 200 and len(allowed.json()["choices"]) == 4


def test_an_abandoned_request_stops_and_a_small_one_is_served_meanwhile(server, http, agent, caplog):
    """The issue's measurement, within the limits: a big request (32 prompts × n=2, four batches)
    whose client hangs up stops within a chunk, and a 1-token request sent meanwhile does not wait for it."""
    batcher, admission = agent.backend, server.app.state.admission
    big = json.dumps({"model": "default", "prompt": [f"Count to {i}:" for i in range(32)], "n": 2,
                      "max_tokens": BIG_TOKENS}).encode()
    everything = 32 * 2
    before = batcher.admitted_rows
    with caplog.at_level(logging.INFO, logger="agent.server"):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw_request(COMPLETIONS, big))
            wait_for(lambda: batcher.admitted_rows > before, 120, "the big request's first batch", poll=0.01)
        small = http.post(COMPLETIONS, json={"model": "default", "prompt": "Hi", "max_tokens": 1})
        served_after = batcher.admitted_rows - before
        assert small.status_code == 200, small.text
        wait_for(lambda: admission.held == 0, 120, "the abandoned request to stop", poll=0.01)
    generated = batcher.admitted_rows - before
    # At most three of the big request's four chunks ran (one running when the client left, one started
    # before the server saw it leave, at worst one more), plus the small request's row; the old server
    # generated all 64 rows, and served the small request after them.
    assert generated <= 3 * MAX_BATCH + 1 < everything + 1
    assert served_after <= 3 * MAX_BATCH + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.server.app"]
    assert any(line.startswith("POST /v1/completions 499") and "client disconnected" in line for line in lines), lines


def test_a_full_server_answers_503_with_retry_after(agent):
    with start(agent, server_config(max_queued=1)) as full, httpx.Client(base_url=full.url, timeout=300) as http:
        admission = full.app.state.admission
        results: list[httpx.Response] = []
        big = {"model": "default", "prompt": [f"Count to {i}:" for i in range(32)], "n": 2, "max_tokens": BIG_TOKENS}
        holder = threading.Thread(target=lambda: results.append(http.post(COMPLETIONS, json=big)))
        holder.start()
        wait_for(lambda: admission.held == 1, 120, "the first request to be admitted", poll=0.01)
        refused = http.post(CHAT, json={"model": "default", "messages": ask("hi"), "max_tokens": 1})
        error = assert_error(refused, 503, "server_overloaded")
        assert error["type"] == "service_unavailable" and refused.headers["retry-after"] == "1"
        holder.join(timeout=300)
        assert results and results[0].status_code == 200
        assert admission.held == 0 and admission.refused == 1
        assert http.post(CHAT, json={"model": "default", "messages": ask("hi"), "max_tokens": 1}).status_code == 200


# --- no stalls: connections that send nothing, or too slowly -------------------------------------------------
def test_silent_and_slow_clients_lose_their_connection(server):
    # Connects and sends nothing: closed after the head timeout (the old server kept it open forever).
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        assert closed_by_server(silent, timeout=30)
    # Sends its head one byte at a time, each within the keep-alive time: closed all the same.
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        head = raw_request(COMPLETIONS, b"{}")
        deadline, closed = time.monotonic() + 30, False
        for byte in head[:-10]:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_by_server(slow, timeout=0.2):
                closed = True
                break
            assert time.monotonic() < deadline
        assert closed
    # Sends its head, then part of its body: a 408 in OpenAI's shape, and the connection closed.
    with socket.create_connection(("127.0.0.1", server.port)) as slow_body:
        body = json.dumps({"model": "default", "prompt": "Hi"}).encode()
        slow_body.sendall(raw_request(COMPLETIONS, body)[:-5])
        slow_body.settimeout(30)
        reply = b""
        while chunk := slow_body.recv(65536):
            reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(payload)["error"]["code"] == "request_timeout"
    # An idle keep-alive connection is closed after server.keep_alive_s.
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        idle.settimeout(30)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_server(idle, timeout=30)


def test_connections_past_the_limit_are_refused(agent):
    with start(agent, server_config(max_connections=2)) as small:
        with socket.create_connection(("127.0.0.1", small.port)) as holder:
            holder.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")  # the server has seen this connection
            holder.settimeout(30)
            assert holder.recv(65536).startswith(b"HTTP/1.1 200")
            assert httpx.get(f"{small.url}/healthz", timeout=30).status_code == 503
        wait_for(lambda: len(small.server.server_state.connections) == 0, 30, "the held connection to close", poll=0.01)
        assert httpx.get(f"{small.url}/healthz", timeout=30).status_code == 200


# --- bad input: a 4xx, never a 500 ---------------------------------------------------------------------------
def _chat(**fields) -> bytes:
    return json.dumps({"model": "default", "messages": ask("hi"), "max_tokens": 1, **fields}).encode()


SURROGATE = "\\ud800"  # as it appears in JSON text: a valid escape that decodes to no valid character
DEEP = 400_000
BAD_BODIES = {
    "surrogate-in-content": (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "a' +
                             SURROGATE.encode() + b'"}]}', "messages.0.content"),
    "surrogate-in-tag": (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], '
                         b'"s2agent": {"tag": "t' + SURROGATE.encode() + b'"}}', "s2agent.tag"),
    "surrogate-in-a-prompt": (COMPLETIONS, b'{"model": "default", "prompt": ["ok", "' + SURROGATE.encode() + b'"]}',
                              "prompt.1"),
    "surrogate-in-a-key": (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "x'
                           + SURROGATE.encode() + b'": 1}', None),
    "surrogate-in-the-model": (CHAT, b'{"model": "' + SURROGATE.encode() + b'", "messages": []}', "model"),
    "nested-400k-deep": (CHAT, b'{"model": "default", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", None),
    "nested-40-deep": (CHAT, b'{"model": "default", "messages": ' + b"[" * 40 + b"]" * 40 + b"}", None),
    "5000-digit-integer": (CHAT, _chat()[:-1] + b', "user": ' + b"7" * 5000 + b"}", None),
    "seed-2**70": (CHAT, _chat(seed=2**70), "seed"),
    "nan-temperature": (CHAT, _chat()[:-1] + b', "temperature": NaN}', None),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_input_is_a_400_never_a_500(http, name, caplog):
    path, body, param = BAD_BODIES[name]
    with caplog.at_level(logging.INFO, logger="agent.server"):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    error = assert_error(response, 400)
    if param is not None:
        assert error["param"] == param, error
    assert "\ud800" not in response.text  # the error itself must be valid text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("version", [10**30, 2**40, -1])
def test_rollback_to_an_impossible_version_is_a_400(http, version):
    response = http.post("/admin/rollback", json={"version": version}, headers={"Authorization": "Bearer secret"})
    assert assert_error(response, 400)["param"] == "version"


def test_a_locked_database_is_a_503_with_retry_after(http, agent, monkeypatch, tmp_path):
    """SQLite's "database is locked" (a real lock, held by another connection) reaching the server: a 503 that
    says when to retry, with the driver's reason and not the SQL statement, instead of a 500."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})

    def write_while_locked() -> list:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES ('user text')"))
        return []

    monkeypatch.setattr(agent, "adapters", write_while_locked)
    try:
        response = http.get("/v1/models")
    finally:
        holder.close()
        engine.dispose()
    error = assert_error(response, 503, "database_unavailable")
    assert response.headers["retry-after"] == "1"
    assert "database is locked" in error["message"] and "INSERT" not in error["message"]
