"""The HTTP server, for real: uvicorn on 127.0.0.1, the tiny llama, a SQLite store, the official openai client.

One agent and one server serve the whole module (starting them per test would dominate the run time);
tests that change what serves (the hot-swap) put it back.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

import agent.errors as agent_errors
from agent import Agent, AgentConfig
from agent.config import ServerConfig
from agent.errors import (
    ConfigError,
    InvalidQueryError,
    ModelNotFoundError,
    PromptTooLongError,
)
from agent.server import create_app
from agent.server.errors import ERRORS, api_error, rule_for
from store import SchemaVersionError, StoreError
from store.schema import without_nul
from tests.conftest import make_random_adapter

ROOT = Path(__file__).resolve().parents[2]
ERROR_KEYS = {"message", "type", "param", "code"}


class ServerThread:
    """A real uvicorn server in a background thread, on a free port of 127.0.0.1 (``options``: more of
    ``uvicorn.Config``'s settings, such as :func:`agent.server.connections.uvicorn_options`)."""

    def __init__(self, app, **options) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def tiny_agent_config(model_dir: Path, data_dir: Path) -> AgentConfig:
    """The conftest ``tiny_config``, built here because this module shares one agent across its tests."""
    config = AgentConfig(model=str(model_dir), db=str(data_dir / "agent.db"), threads=1, max_new_tokens=8, seed=0)
    config.system2.samples = 4
    config.system2.max_new_tokens = 16
    config.server.admin_token = "secret"
    config.server.max_body_bytes = 64_000
    config.server.max_tokens_limit = 64
    return config


@pytest.fixture(scope="module")
def agent(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, module_db_url: str):
    config = tiny_agent_config(tiny_model_dir, tmp_path_factory.mktemp("server-agent"))
    config.db = module_db_url  # a SQLite file, then a PostgreSQL database: the module runs on each
    agent = Agent(config)
    yield agent
    agent.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the OpenAI client ---------------------------------------------------------------------------------------
def test_chat_completion_goes_through_the_learning_loop(client, agent):
    response = client.chat.completions.create(model="default", messages=ask("What is 47 + 38?"), max_tokens=8,
                                              extra_body={"s2agent": {"route": "system2", "tag": "arithmetic"}})
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == agent.model_name
    [choice] = response.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = response.model_extra["s2agent"]
    assert set(extra) == {"route", "confidence", "method", "adapter_version", "accepted", "votes", "interaction_id", "tag"}
    assert extra["method"] == "pal" and isinstance(extra["confidence"], float)  # auto: programs first, no fallback
    assert usage.completion_tokens_details.reasoning_tokens > 0  # System 2 ran (forced)
    logged = agent.store.get_interaction(extra["interaction_id"])
    assert logged.final_answer == without_nul(choice.message.content) and logged.tag == "arithmetic"  # as stored


def test_streamed_chat_completion_concatenates_to_the_answer(client, agent):
    stream = client.chat.completions.create(model=agent.model_name, messages=ask("Name a primary colour."),
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"s2agent": {"route": "system1"}})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    finals = [c for c in content if c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    extra = finals[0].model_extra["s2agent"]
    assert extra["route"] == "system1"
    assert agent.store.get_interaction(extra["interaction_id"]).final_answer == text
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0


def test_n_samples_and_multi_turn_are_plain_system1(client):
    response = client.chat.completions.create(model="default", messages=ask("Flip a coin."), n=2, temperature=0.9,
                                              seed=1, max_tokens=6)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.model_extra["s2agent"]["route"] == "system1"
    assert response.model_extra["s2agent"]["interaction_id"] is None  # nothing learned
    assert response.usage.completion_tokens == response.usage.total_tokens - response.usage.prompt_tokens
    turns = [*ask("Hello"), {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again?"}]
    response = client.chat.completions.create(model="default", messages=turns, max_completion_tokens=4, stop=["\n"])
    assert len(response.choices) == 1 and response.model_extra["s2agent"]["route"] == "system1"


def test_concurrent_requests_each_get_their_own_answer(client):
    questions = [f"What is {i} + {i}?" for i in range(8)]

    def one(question: str):
        return client.chat.completions.create(model="default", messages=ask(question),
                                              extra_body={"s2agent": {"route": "system1"}})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, questions))
    assert len({r.id for r in responses}) == 8
    assert all(len(r.choices) == 1 for r in responses)
    ids = [r.model_extra["s2agent"]["interaction_id"] for r in responses]
    assert len(set(ids)) == 8


def test_models_and_raw_completions(client, agent):
    models = client.models.list()
    assert models.data[0].id == agent.model_name and models.data[0].object == "model"
    completion = client.completions.create(model=agent.model_name, prompt="The capital of France is", max_tokens=5)
    assert completion.object == "text_completion" and len(completion.choices) == 1
    assert isinstance(completion.choices[0].text, str) and completion.usage.prompt_tokens > 0
    batch = client.completions.create(model="default", prompt=["A coin", "Alice flips"], max_tokens=3,
                                      extra_body={"s2agent": {"tag": "coin_flip"}})
    assert len(batch.choices) == 2
    assert batch.model_extra["s2agent"]["tag"] == "coin_flip"  # the tag it was served under, as for chats
    assert completion.model_extra["s2agent"]["tag"] is None


def test_streamed_raw_completion(http):
    with http.stream("POST", "/v1/completions",
                     json={"model": "default", "prompt": "Red, blue,", "max_tokens": 4, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# --- bad input -----------------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "default", "messages": [', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (b"", 400, "invalid_body"),
        ('{"model": "default", "messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"), 400,
         "invalid_body"),
        (json.dumps({"model": "default"}).encode(), 400, "missing"),
        (json.dumps({"model": "default", "messages": "hi"}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "default", "messages": ask("hi"), "temperature": "hot"}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "default", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, None),
        (json.dumps({"model": "default", "messages": ask("hi"), "s2agent": {"route": "system3"}}).encode(), 400, None),
        (json.dumps({"model": "gpt-4o", "messages": ask("hi")}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "default", "messages": ask("hi"), "max_tokens": 65}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "default", "messages": ask("hi"), "max_tokens": 0}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "default", "messages": ask("  ")}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "default", "messages": ask("apple house " * 300)}).encode(), 400,
         "context_length_exceeded"),
        (json.dumps({"model": "default", "messages": ask("hi"), "tools": [{"type": "function"}]}).encode(), 400,
         "unsupported_parameter"),
        (json.dumps({"model": "default", "messages": ask("hi"), "s2agent": {"route": "system2", "method": "nope"}}).encode(), 400, None),
    ],
    ids=["malformed-json", "not-an-object", "empty", "not-utf8", "missing-messages", "messages-wrong-type",
         "temperature-wrong-type", "unknown-role", "unknown-route", "unknown-model", "max-tokens-too-big",
         "max-tokens-zero", "empty-query", "prompt-too-long", "tools", "unknown-method"],
)
def test_bad_chat_requests_get_openai_errors(http, body, status, code):
    assert_error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), status, code)
    assert http.get("/healthz").status_code == 200


def test_oversized_bodies_are_refused(http, agent):
    limit = agent.config.server.max_body_bytes
    big = json.dumps({"model": "default", "messages": ask("x" * (limit + 10))}).encode()
    assert_error(http.post(CHAT, content=big), 413, "request_too_large")  # by Content-Length

    def chunked():  # no Content-Length: the streamed size is what counts
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    response = http.post(CHAT, content=chunked())
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")


def test_bad_raw_completions_and_unknown_paths(http):
    assert_error(http.post("/v1/completions", json={"model": "default", "prompt": ""}), 400, "invalid_value")
    assert_error(http.post("/v1/completions", json={"model": "default", "prompt": 3}), 400, "invalid_value")
    assert_error(http.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404, "model_not_found")
    assert_error(http.post("/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 10_000}), 400)
    assert_error(http.post("/v1/completions", json={"model": "default", "prompt": "a", "echo": True}), 400,
                 "unsupported_parameter")
    for prompt in ("apple house " * 300, ["Red, blue,", "apple house " * 300]):  # one prompt, or one of several
        error = assert_error(http.post("/v1/completions", json={"model": "default", "prompt": prompt}), 400,
                             "context_length_exceeded")
        assert error["param"] == "prompt"
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get(CHAT), 405)


def test_clients_that_hang_up_do_no_harm(server, http, agent, caplog):
    question = "Alice flips the coin. Did she?"
    body = json.dumps({"model": "default", "messages": ask(question), "stream": True,
                       "s2agent": {"route": "system2"}}).encode()
    with caplog.at_level(logging.INFO, logger="agent.server"):
        # Hang up while System 2 is still thinking, before the first event...
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
        # ...and after the first event.
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", CHAT, json={"model": "default", "messages": ask("hi " * 20), "stream": True,
                                              "max_tokens": 32, "s2agent": {"route": "system1"}}) as response:
                assert response.status_code == 200
                next(response.iter_lines())
        # Whether the server notices the first hang-up depends on timing: noticed, System 2 is dropped at its
        # next step and the 499 logged, with nothing recorded (`Agent.answer` records no cancelled answer);
        # not noticed (a fast System 2), the answer is recorded as usual. One of the two must happen, and the
        # server keeps serving either way.
        def settled() -> bool:
            cancelled = any(" 499 " in r.getMessage() and "client disconnected" in r.getMessage()
                            for r in caplog.records)
            return cancelled or any(i.input == question for i in agent.store.list_interactions(limit=50))

        deadline = time.monotonic() + 30
        while not settled():
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        assert http.post(CHAT, json={"model": "default", "messages": ask("still there?")}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_runtime_errors_answer_by_the_table(http, agent, monkeypatch):
    error = assert_error(http.post(CHAT, json={"model": "default", "messages": ask("hi"),
                                               "s2agent": {"route": "system2", "method": "nope"}}), 400, "invalid_value")
    assert error["param"] == "s2agent"

    def store_down() -> list:
        raise StoreError("the adapter registry is inconsistent")

    monkeypatch.setattr(agent, "adapters", store_down)  # outside a rollback a StoreError is not the client's doing
    error = assert_error(http.get("/v1/models"), 503, "store_error")
    assert error["type"] == "service_unavailable" and "inconsistent" in error["message"]
    assert_error(http.post(CHAT, json={"model": "gpt-4o", "messages": ask("hi")}), 503, "store_error")


def test_the_error_table():
    assert rule_for(PromptTooLongError("long"), "completion").code == "context_length_exceeded"
    assert api_error(PromptTooLongError("long"), "completion").param == "prompt"
    assert api_error(InvalidQueryError("empty"), "chat").param == "messages"
    assert api_error(ConfigError("no method 'x'"), "chat").status == 400
    assert api_error(ConfigError("bad config"), "rollback").status == 503  # not the client's fault there
    for exc in (StoreError("no such version"), SchemaVersionError("newer schema", found=9, supported=3)):  # a subclass takes its root's
        assert (api_error(exc, "rollback").status, api_error(exc, "rollback").code) == (409, "rollback_refused")
        assert (api_error(exc, "chat").status, api_error(exc).code) == (503, "store_error")
    assert api_error(ModelNotFoundError("gone")).status == 503
    assert rule_for(ValueError("a bug")) is None
    # Every input error of the runtime has a 4xx row of its own, not the 503 of its root.
    for name in agent_errors.__all__:
        cls = getattr(agent_errors, name)
        if isinstance(cls, type) and issubclass(cls, agent_errors.S2AgentError) and issubclass(cls, ValueError):
            assert any(key[0] is cls and rule.status < 500 for key, rule in ERRORS.items()), name


# --- operations ----------------------------------------------------------------------------------------------
def test_health_readiness_and_metrics(http, client, agent):
    client.chat.completions.create(model="default", messages=ask("What is 2 + 2?"))
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["pending_examples"] == agent.pending_examples()
    text = http.get("/metrics").text
    for name in ("s2agent_http_requests_total", "s2agent_http_request_duration_seconds_bucket",
                 "s2agent_answers_total", "s2agent_answer_duration_seconds_bucket",
                 "s2agent_system2_acceptance_rate", "s2agent_buffer_examples", "s2agent_serving_adapter_version",
                 "s2agent_consolidation_runs_total", "s2agent_tokens_generated_total", "s2agent_store_up 1"):
        assert name in text, name
    assert 's2agent_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 's2agent_tokens_generated_total{system="system1"}' in text


def test_admin_routes_need_the_token(http):
    assert_error(http.get("/admin/stats"), 401, "missing_token")
    assert_error(http.get("/admin/stats", headers={"Authorization": "Bearer wrong"}), 403, "invalid_token")
    ok = http.get("/admin/stats", headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and "examples" in ok.json() and "interactions" in ok.json()
    adapters = http.get("/admin/adapters", headers={"Authorization": "Bearer secret"})
    assert adapters.status_code == 200 and adapters.json()["object"] == "list"
    report = http.post("/admin/consolidate", headers={"Authorization": "Bearer secret"})
    assert report.status_code == 200, report.text
    assert {"status", "reason", "run_id", "adapter_version"} <= set(report.json())


def test_admin_consolidate_runs_as_the_scheduler_does_and_never_on_a_serve_only_server(agent):
    """In the scheduler's way (a niced child process by default), not in the server's own threads; refused by a
    server started with --no-train."""
    with ServerThread(create_app(agent)) as running, httpx.Client(base_url=running.url, timeout=300) as c:
        report = c.post("/admin/consolidate", headers={"Authorization": "Bearer secret"})
        assert report.status_code == 200, report.text
        runner = agent.consolidation_runner()
        assert runner.last_report.status == report.json()["status"]
        assert not runner.started  # an embedded agent's triggers stay off: only what was asked for ran
        agent.config.scheduler.enabled = False
        try:
            refused = assert_error(c.post("/admin/consolidate", headers={"Authorization": "Bearer secret"}), 409,
                                   "training_disabled")
        finally:
            agent.config.scheduler.enabled = True
        assert "--no-train" in refused["message"]


def test_admin_routes_are_disabled_without_a_token(agent):
    with ServerThread(create_app(agent, ServerConfig(admin_token=None))) as running:
        with httpx.Client(base_url=running.url) as c:
            for method, path in (("GET", "/admin/stats"), ("POST", "/admin/consolidate"),
                                 ("GET", "/admin/adapters"), ("POST", "/admin/rollback")):
                error = assert_error(c.request(method, path, headers={"Authorization": "Bearer secret"}), 403,
                                     "admin_disabled")
                assert "S2AGENT_ADMIN_TOKEN" in error["message"]
            assert c.get("/healthz").status_code == 200


# --- a new adapter is served without a restart ---------------------------------------------------------------
def test_hot_swap_and_rollback(client, http, agent, tiny_model_dir, tmp_path):
    admin = {"Authorization": "Bearer secret"}
    path = make_random_adapter(tiny_model_dir, tmp_path / "adapter")
    version = agent.store.next_adapter_version()
    agent.store.register_adapter(version=version, path=str(path), parent=None)
    agent.store.promote_adapter(version)
    agent.refresh_adapters(force=True)

    ids = [m.id for m in client.models.list().data]
    adapter_id = f"{agent.model_name}:adapter-v{version}"
    assert adapter_id in ids
    response = client.chat.completions.create(model=adapter_id, messages=ask("What is 1 + 1?"))
    assert response.model_extra["s2agent"]["adapter_version"] == version
    assert response.model == adapter_id

    rolled = http.post("/admin/rollback", json={"version": 0}, headers=admin)
    assert rolled.status_code == 200 and rolled.json() == {"serving": None, "adapter_version": None}
    response = client.chat.completions.create(model="default", messages=ask("What is 1 + 1?"))
    assert response.model_extra["s2agent"]["adapter_version"] is None
    assert_error(http.post(CHAT, json={"model": adapter_id, "messages": ask("hi")}), 404, "model_not_found")
    assert_error(http.post("/admin/rollback", json={"version": 99}, headers=admin), 409, "rollback_refused")
    assert_error(http.post("/admin/rollback", json={"version": "x"}, headers=admin), 400)


# --- life cycle ----------------------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_server import tiny_agent_config
        from agent import Agent
        from agent.server import serve
        from pathlib import Path
        config = tiny_agent_config(Path({str(tiny_model_dir)!r}), Path({str(tmp_path)!r}))
        config.max_new_tokens = 64
        serve(Agent(config), host="127.0.0.1", port={port}, timeout_graceful_shutdown=30)
        print("serve returned", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        results: list[httpx.Response] = []

        def in_flight() -> None:  # System 2 on a long prompt: still running when SIGTERM arrives
            results.append(httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "default", "messages": ask("Take the last letters of the words " * 8),
                "s2agent": {"route": "system2"}}))

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results and results[0].status_code == 200, output
    assert proc.returncode == 0, output
    assert "closing the agent" in output and "serve returned" in output
