"""System 2 on a teacher behind an OpenAI-compatible endpoint, for real.

The teacher is a second s2agent server on 127.0.0.1 (uvicorn, the tiny llama taught to answer one question
with and without chain-of-thought); its trouble (down, slow, 429, malformed replies, no ``n``) comes from a
small stdlib HTTP server that answers what each test scripts. The student is the tiny llama of conftest:
only the model that writes the votes changes, the filter, the store and the gate are the local ones.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from agent import Agent, AgentConfig
from agent.backends.teacher import CircuitBreaker, TeacherClient, retry_after_seconds
from agent.config import TeacherConfig
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.server import create_app
from policies.system2 import make_method
from policies.system2.base import chat
from tests.agent.test_server import ServerThread
from tests.conftest import teach_pairs

QUESTION = "What is 47 + 38?"


# --- the teacher: a second s2agent server ---------------------------------------------------------------
def method_messages(name: str, query: str) -> list[dict[str, str]]:
    """The chat a System 2 method sends for ``query``: what the teacher must have learnt to answer."""
    method = make_method(name)
    messages = chat(method.prompts["system"], method.prompts["user"].format(query=query))
    return [{"role": role, "content": content} for role, content in messages]


@pytest.fixture(scope="module")
def teacher_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teach_pairs(tiny_model_dir, tmp_path_factory.mktemp("teacher-llama"), [
        (method_messages("direct", QUESTION), "Answer: 85"),
        (method_messages("cot", QUESTION), "47 + 38 = 85.\nAnswer: 85"),
    ], steps=120, max_length=160)


@pytest.fixture(scope="module")
def teacher(teacher_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = AgentConfig(model=str(teacher_model_dir), db=str(tmp_path_factory.mktemp("teacher") / "t.db"),
                         threads=1, max_new_tokens=16)
    config.routing.router = "never"  # the teacher answers; it does not run a System 2 of its own
    agent = Agent(config)
    try:
        with ServerThread(create_app(agent)) as running:
            yield running
    finally:
        agent.close()


def teacher_chat_requests(teacher: ServerThread) -> int:
    """POST /v1/chat/completions the teacher server has answered, read from its own /metrics."""
    text = httpx.get(f"{teacher.url}/metrics", timeout=30).text
    return sum(int(float(n)) for n in re.findall(
        r'^s2agent_http_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} (\S+)$', text, re.MULTILINE))


def student_config(model_dir: Path, data: Path, base_url: str, **teacher: Any) -> AgentConfig:
    config = AgentConfig(model=str(model_dir), db=str(data / "student.db"), threads=1, max_new_tokens=8, seed=0)
    config.system2.samples = 4
    config.system2.max_new_tokens = 24
    config.system2.timeout_s = 60
    config.scoping.auto = False
    config.system2.teacher = TeacherConfig(base_url=base_url, **teacher)
    return config


@pytest.fixture
def student(tiny_model_dir: Path, tmp_path: Path, teacher: ServerThread) -> Iterator[Agent]:
    agent = Agent(student_config(tiny_model_dir, tmp_path, f"{teacher.url}/v1", never_send=["private"],
                                 price_prompt_per_1m=1.0, price_completion_per_1m=2.0))
    yield agent
    agent.close()


# --- the real teacher -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["teacher:direct", "teacher:cot"])
def test_teacher_votes_become_stored_examples(student: Agent, method: str) -> None:
    answer = student.answer(QUESTION, route="system2", method=method)

    assert (answer.route, answer.method, answer.text, answer.accepted) == ("system2", method, "85", True)
    assert answer.votes == {"85": 4}
    assert answer.teacher_prompt_tokens > 0 and answer.teacher_completion_tokens > 0
    assert answer.tokens_system2 == answer.teacher_completion_tokens  # the teacher wrote every System 2 token
    assert answer.teacher_cost == pytest.approx(
        (answer.teacher_prompt_tokens * 1.0 + answer.teacher_completion_tokens * 2.0) / 1e6)
    [example] = student.store.list_examples()
    assert (example.input, example.target, example.method, example.status) == (QUESTION, "85", method, "pending")
    row = student.store.get_interaction(answer.interaction_id)
    assert row is not None and row.teacher_completion_tokens == answer.teacher_completion_tokens
    stats = student.store.stats()["interactions"]
    assert stats["teacher_accepted"] == 1 and stats["teacher_prompt_tokens"] == answer.teacher_prompt_tokens
    counters = student.teacher_stats()
    assert counters is not None and counters["failures"] == 0 and counters["requests"] == 1  # k samples: one n=4
    text = Metrics().render(None, None, counters)
    assert f's2agent_teacher_tokens_total{{kind="completion"}} {answer.teacher_completion_tokens}' in text
    assert "s2agent_teacher_cost_total" in text and "s2agent_teacher_breaker_open 0" in text


def test_auto_asks_the_teacher_only_when_the_local_programs_do_not_agree(student: Agent) -> None:
    answer = student.answer(QUESTION, route="system2")  # the tiny student writes no program that runs

    assert answer.route_reason["system2_tried"] == ["pal", "cot"]
    assert (answer.method, answer.text, answer.accepted) == ("teacher:cot", "85", True)
    assert answer.teacher_completion_tokens > 0
    assert [e.method for e in student.store.list_examples()] == ["teacher:cot"]


def test_never_send_keeps_a_scope_off_the_teacher(student: Agent, teacher: ServerThread) -> None:
    before = teacher_chat_requests(teacher)
    answer = student.answer(QUESTION, route="system2", method="teacher:cot", tag="private")
    auto = student.answer(QUESTION, route="system2", tag="private")

    assert teacher_chat_requests(teacher) == before  # not one request reached the teacher
    assert answer.route_reason["teacher"] == "withheld" and auto.route_reason["teacher"] == "withheld"
    assert answer.teacher_prompt_tokens == answer.teacher_completion_tokens == 0
    assert answer.method == "cot"  # the same method ran on the local model
    assert student.teacher_stats()["withheld"] == 2
    student.answer(QUESTION, route="system2", method="teacher:direct", tag="public")
    assert teacher_chat_requests(teacher) == before + 1  # the switch is per scope, not a global off


def test_the_server_reports_teacher_tokens(student: Agent) -> None:
    with ServerThread(create_app(student)) as server:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "default", "messages": [{"role": "user", "content": QUESTION}],
            "s2agent": {"route": "system2", "method": "teacher:direct"}}).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert reply["s2agent"]["method"] == "teacher:direct" and reply["choices"][0]["message"]["content"] == "85"
    assert reply["s2agent"]["teacher"]["completion_tokens"] > 0
    assert 's2agent_teacher_tokens_total{kind="prompt"}' in metrics


# --- a scripted endpoint for the failures -------------------------------------------------------------
Reply = tuple[int, dict[str, str], bytes]


def completion(texts: list[str], prompt_tokens: int = 7, completion_tokens: int = 5) -> Reply:
    body = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


class Scripted:
    """A real HTTP server on 127.0.0.1 answering the ``i``-th POST with ``script(i, body)``."""

    def __init__(self, script: Callable[[int, dict[str, Any]], Reply], delay_s: float = 0.0) -> None:
        self.script, self.delay_s = script, delay_s
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    index = len(outer.bodies)
                    outer.bodies.append(body)
                    outer.times.append(time.monotonic())
                time.sleep(outer.delay_s)
                status, headers, payload = outer.script(index, body)
                try:
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_on(tiny_model_dir: Path, tmp_path: Path, url: str, **teacher: Any) -> Agent:
    return Agent(student_config(tiny_model_dir, tmp_path, url, **teacher))


def test_429_with_retry_after_is_retried_then_answered(tiny_model_dir: Path, tmp_path: Path) -> None:
    def script(i: int, body: dict[str, Any]) -> Reply:
        if i == 0:
            return 429, {"Retry-After": "1"}, b'{"error": {"message": "slow down"}}'
        return completion(["Answer: 7"] * body.get("n", 1))

    with Scripted(script) as endpoint, agent_on(tiny_model_dir, tmp_path, endpoint.url, backoff_s=20) as agent:
        answer = agent.answer(QUESTION, route="system2", method="teacher:direct")
        stats = agent.teacher_stats()
    assert (answer.route, answer.text, answer.accepted) == ("system2", "7", True)
    assert len(endpoint.bodies) == 2 and endpoint.bodies[0] == endpoint.bodies[1]
    assert 0.9 <= endpoint.times[1] - endpoint.times[0] < 5  # waited as told (Retry-After), not backoff_s
    assert stats["retries"] == 1 and stats["failures"] == 1 and not stats["breaker_open"]
    assert (answer.teacher_prompt_tokens, answer.teacher_completion_tokens) == (7, 5)


def test_teacher_down_system1_answers_and_the_breaker_opens(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with agent_on(tiny_model_dir, tmp_path, url, max_retries=1, backoff_s=0.01, breaker_failures=2,
                  breaker_cooldown_s=60) as agent:
        first = agent.answer(QUESTION, route="system2", method="teacher:cot")
        second = agent.answer(QUESTION, route="system2", method="teacher:cot")
        stats = agent.teacher_stats()
        text = Metrics().render(None, None, stats)
    assert first.route == "system1" and first.text == first.system1_text
    assert first.error.startswith("TeacherError") and "after 2 attempts" in first.error
    assert second.route == "system1" and second.error.startswith("TeacherUnavailable")
    assert (stats["failures"], stats["retries"], stats["skipped"]) == (2, 1, 1) and stats["breaker_open"]
    assert "s2agent_teacher_breaker_open 1" in text and 's2agent_teacher_events_total{event="skipped"} 1' in text
    assert agent.store.list_examples() == []


def test_slow_teacher_times_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    with Scripted(lambda i, body: completion(["Answer: 7"]), delay_s=3) as endpoint, \
            agent_on(tiny_model_dir, tmp_path, endpoint.url, timeout_s=0.3, max_retries=0) as agent:
        started = time.monotonic()
        answer = agent.answer(QUESTION, route="system2", method="teacher:direct")
        elapsed = time.monotonic() - started
    assert answer.route == "system1" and "no reply within 0.3 s" in answer.error
    assert elapsed < 2.5


@pytest.mark.parametrize("reply", [
    (200, {"Content-Type": "application/json"}, b"this is not json"),
    (200, {"Content-Type": "application/json"}, b'{"choices": []}'),
    (200, {"Content-Type": "application/json"}, b'{"choices": [{"message": {"content": null}}], "usage": "lots"}'),
    (200, {"Content-Type": "application/json"}, b'["a list"]'),
])
def test_malformed_teacher_output_is_a_rejected_vote(tiny_model_dir: Path, tmp_path: Path, reply: Reply) -> None:
    with Scripted(lambda i, body: reply) as endpoint, agent_on(tiny_model_dir, tmp_path, endpoint.url) as agent:
        answer = agent.answer(QUESTION, route="system2", method="teacher:direct")
        stats = agent.teacher_stats()
    assert answer.route == "system1" and answer.error == "System 2 gave no parsable answer"
    assert answer.votes == {"<none>": 4} and answer.accepted is False  # four votes without an answer
    assert stats["malformed"] >= 1


def test_an_endpoint_without_n_gets_parallel_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    with Scripted(lambda i, body: completion(["Answer: 7"], completion_tokens=3)) as endpoint, \
            agent_on(tiny_model_dir, tmp_path, endpoint.url) as agent:
        first = agent.answer(QUESTION, route="system2", method="teacher:direct")
        asked = [b.get("n") for b in endpoint.bodies]
        second = agent.answer("What is 1 + 6?", route="system2", method="teacher:direct")
    assert first.votes == second.votes == {"7": 4} and first.accepted and second.accepted
    assert asked == [4, None, None, None]  # n=4 answered with one choice: topped up one by one
    assert [b.get("n") for b in endpoint.bodies[4:]] == [None] * 4  # remembered: no n any more
    assert second.teacher_completion_tokens == 12


# --- configuration and parts --------------------------------------------------------------------------
def test_a_teacher_method_without_a_teacher_is_a_config_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = AgentConfig(model=str(tiny_model_dir), db=str(tmp_path / "a.db"), threads=1)
    config.system2.methods_by_tag = {"legal": "teacher:cot"}
    with pytest.raises(ConfigError, match=r"teacher:cot.*\[system2.teacher\] base_url"):
        Agent(config)
    config.system2.methods_by_tag = {}
    with Agent(config) as agent, pytest.raises(ConfigError, match="needs a teacher"):
        agent.answer(QUESTION, route="system2", method="teacher:direct")


@pytest.mark.parametrize("key, value, words", [
    ("system2.teacher.base_url", "gpu-host:8000/v1", "must be an http:// or https:// URL"),
    ("system2.teacher.max_concurrency", 0, "must be in [1, inf)"),
    ("system2.teacher.timeout_s", 0, "must be in (0, inf)"),
    ("system2.teacher.price_prompt_per_1m", -1, "must be in [0, inf)"),
    ("system2.method", "teacher:tot", "must be one of"),
    ("system2.methods_by_tag", {"a": "teacher:nope"}, "is not one of"),
])
def test_teacher_config_values_are_checked(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(env={}, overrides={key: value})
    assert repr(key) in str(info.value) and words in str(info.value)


def test_teacher_config_loads_from_toml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[system2]\nmethod = "teacher:direct"\n[system2.teacher]\nbase_url = "http://gpu:8000/v1"\n'
                    'model = "Qwen/Qwen2.5-7B-Instruct"\nnever_send = ["medical"]\n')
    config = AgentConfig.load(path, env={"S2AGENT_SYSTEM2__TEACHER__MAX_RETRIES": "5"})
    assert config.system2.method == "teacher:direct" and config.system2.teacher.max_retries == 5
    assert config.system2.teacher.never_send == ["medical"] and config.system2.teacher.withholds("medical")
    assert AgentConfig.from_dict(config.to_dict()) == config
    config.system2.teacher.timeout_s = -1
    with pytest.raises(ConfigError, match="system2.teacher.timeout_s"):
        config.validate()


def test_every_teacher_field_is_documented() -> None:
    import ast
    import inspect

    import agent.config

    tree = ast.parse(inspect.getsource(agent.config))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TeacherConfig"]
    for node, after in zip(cls.body, cls.body[1:]):
        if isinstance(node, ast.AnnAssign):
            assert isinstance(after, ast.Expr) and isinstance(after.value.value, str), node.target.id


def test_the_api_key_comes_from_the_named_variable() -> None:
    config = TeacherConfig(base_url="http://127.0.0.1:9/v1", api_key_env="MY_TEACHER_KEY")
    with pytest.raises(ConfigError, match=r"\$MY_TEACHER_KEY, which is not set"):
        TeacherClient(config, environ={})
    client = TeacherClient(config, environ={"MY_TEACHER_KEY": "sk-123"})
    assert client._http.headers["Authorization"] == "Bearer sk-123"
    client.close()


def test_circuit_breaker_opens_cools_down_and_probes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=lambda: now[0])
    for _ in range(2):
        breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow() and breaker.opened == 1
    now[0] = 10.5
    assert breaker.allow() and not breaker.allow()  # half-open: one probe at a time
    breaker.failure()  # the probe failed: open for another cool-down
    assert breaker.is_open and breaker.opened == 2
    now[0] = 21
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def test_store_stats_show_teacher_spend(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from agent.cli import main
    from store import Store

    db = tmp_path / "agent.db"
    with Store(str(db)) as store:
        store.log_interaction(input="a", route="system2", final_answer="85", accepted=True,
                              teacher_prompt_tokens=1000, teacher_completion_tokens=500)
        store.log_interaction(input="b", route="system2", final_answer="", accepted=False,
                              teacher_prompt_tokens=1000, teacher_completion_tokens=500)
    config = tmp_path / "agent.toml"
    config.write_text("[system2.teacher]\nbase_url = \"http://127.0.0.1:9/v1\"\n"
                      "price_prompt_per_1m = 1.0\nprice_completion_per_1m = 4.0\n")
    assert main(["--config", str(config), "--db", str(db), "store", "stats"]) == 0
    out = capsys.readouterr().out
    assert "teacher: 2000 prompt + 1000 completion tokens, cost 0.0060; 1 accepted answers, 3000 tokens each" in out
    assert main(["--config", str(config), "--db", str(db), "store", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"]["teacher_cost"] == pytest.approx(0.006)


def test_bench_paper_rows_count_the_teachers_tokens(tiny_model_dir: Path, tmp_path: Path,
                                                    teacher: ServerThread) -> None:
    from bench import paper

    config = student_config(tiny_model_dir, tmp_path, f"{teacher.url}/v1")
    settings = paper.PaperSettings(tasks=["addition"], methods=["teacher:direct"], label_method="teacher:direct",
                                   n_train=3, n_eval=2, n_eval_prompting=2, k=2)
    result = paper.run(settings, config, tmp_path / "paper")
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["system2:teacher:direct"]["teacher_tokens_per_query"] > 0
    assert rows["distilled"]["teacher_tokens_per_accepted"] > 0 and rows["distilled"]["label_method"] == "teacher:direct"
    assert "teacher" in paper.table(result["rows"])


def test_bench_loop_counts_the_teachers_tokens_per_round(tiny_model_dir: Path, tmp_path: Path,
                                                          teacher: ServerThread) -> None:
    """The learning curve with a teacher: each round says what the teacher was paid per query."""
    from bench import loop

    config = student_config(tiny_model_dir, tmp_path, f"{teacher.url}/v1")
    config.routing.threshold = 1.0  # every query goes to System 2, so to the teacher
    result = loop.run(loop.LoopSettings(task="addition", queries=2, round=1, method="teacher:direct", n_eval=1, k=2,
                                        batch="none"), config, tmp_path / "loop")
    rounds = result["rounds"][1:]
    assert len(rounds) == 2 and all(r["teacher_tokens_per_query"] > 0 for r in rounds), rounds
    assert "teacher tok/q" in loop.table(result)
