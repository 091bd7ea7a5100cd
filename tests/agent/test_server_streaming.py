"""Streaming, cancellation and OpenAI conformance, for real: uvicorn on 127.0.0.1, the tiny llama, the openai client.

Ordering, not timing: the tiny model decodes 64 tokens faster than a client parses one chunk, so the tests that
look at a decode in progress meter its steps (:func:`metered`: each decode step of the real engine first takes
a permit the test hands out) and check what the client has received while the decode cannot have finished.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError

from agent import Agent
from tests.agent.test_server import ask, tiny_agent_config
from tests.agent.test_server_abuse import raw_request
from tests.conftest import make_random_adapter, wait_for

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def agent(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = tiny_agent_config(tiny_model_dir, tmp_path_factory.mktemp("streaming-agent"))
    config.batch_wait_ms = 0
    agent = Agent(config)
    yield agent
    agent.close()


def no_eos(agent: Agent) -> dict[str, float]:
    """A ``logit_bias`` that keeps the end-of-sequence token away, so that an answer runs to ``max_tokens``."""
    return {str(agent.backend.inner.tokenizer.eos_token_id): -100}


@pytest.fixture
def metered(agent, monkeypatch):
    """Permits for the engine's decode steps: the real ``step`` runs once per permit the test releases."""
    engine = agent.backend.inner
    permits = threading.Semaphore(0)
    real = engine.step

    def step(batch):
        permits.acquire()
        return real(batch)

    monkeypatch.setattr(engine, "step", step)
    yield permits
    monkeypatch.undo()
    permits.release(10_000)  # a step still waiting goes on


def logged(agent: Agent, question: str) -> bool:
    return any(i.input == question for i in agent.store.list_interactions(limit=200))


# --- streaming -----------------------------------------------------------------------------------------------
def test_tokens_arrive_while_the_answer_is_still_decoding(client, agent, metered):
    question = "Name a primary colour, slowly."
    metered.release(3)  # three decode steps, then the engine waits
    stream = client.chat.completions.create(model="default", messages=ask(question), max_tokens=64, stream=True,
                                            logit_bias=no_eos(agent), stream_options={"include_usage": True},
                                            extra_body={"s2agent": {"route": "system1"}})
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant"
    first_text = next(chunks)
    assert first_text.choices[0].delta.content and first_text.choices[0].finish_reason is None
    assert not logged(agent, question)  # received while at most 3 of its 64 tokens were decoded
    metered.release(10_000)
    rest = list(chunks)
    content = [c for c in rest if c.choices]
    text = first_text.choices[0].delta.content + "".join(c.choices[0].delta.content or "" for c in content)
    assert len(content) > 8  # token by token, not one piece
    final = content[-1]
    assert final.choices[0].finish_reason == "length"
    assert rest[-1].choices == [] and rest[-1].usage.completion_tokens == 64
    interaction = agent.store.get_interaction(final.model_extra["s2agent"]["interaction_id"])
    assert interaction.final_answer == text


def test_the_first_token_is_sent_when_decoded_not_at_the_next_client_check(client, agent, metered, monkeypatch):
    """While it waits for the first token the route also checks, every ``DISCONNECT_POLL_S``, that the client is
    still there; the token must not wait for that check. With the check an hour away, the first text still
    comes while the decode is held after 3 steps (it once came only at the check: 0.25 s, most of a short
    answer on a GPU)."""
    monkeypatch.setattr("agent.server.live.DISCONNECT_POLL_S", 3600.0)
    metered.release(3)
    stream = client.with_options(timeout=30, max_retries=0).chat.completions.create(
        model="default", messages=ask("Name a colour, now."), max_tokens=64, stream=True,
        logit_bias=no_eos(agent), extra_body={"s2agent": {"route": "system1"}})
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    assert next(chunks).choices[0].delta.content
    metered.release(10_000)
    assert list(chunks)[-1].choices[0].finish_reason == "length"


def test_a_client_that_leaves_cancels_its_generation(server, agent, metered):
    question = "Tell a long story about a coin."
    batcher = agent.backend
    metered.release(3)
    dropped = batcher.dropped_rows
    body = {"model": "default", "messages": ask(question), "max_tokens": 64, "stream": True,
            "logit_bias": no_eos(agent), "s2agent": {"route": "system1"}}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", CHAT, json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the answer is decoding
    time.sleep(0.5)  # the client hung up while the decode waits; the server reads the disconnect
    steps = batcher.steps
    metered.release(10_000)
    deadline = time.monotonic() + 20
    while batcher.dropped_rows == dropped:
        assert time.monotonic() < deadline, "the abandoned row was never dropped"
        time.sleep(0.02)
    assert batcher.steps - steps <= 2  # dropped at the next step, not after the 60 tokens left
    time.sleep(0.2)
    assert not logged(agent, question)  # nothing answered, nothing recorded
    assert server.app.state.admission.held == 0


def test_a_client_that_leaves_before_a_whole_answer_cancels_it(server, agent, metered):
    """Not streamed, the same: the server watches the connection while the answer is generated."""
    question = "Tell a long story about a die."
    batcher, admission = agent.backend, server.app.state.admission
    dropped, admitted = batcher.dropped_rows, batcher.admitted_rows
    body = json.dumps({"model": "default", "messages": ask(question), "max_tokens": 64, "logit_bias": no_eos(agent),
                       "s2agent": {"route": "system1"}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_request(CHAT, body))
        wait_for(lambda: batcher.admitted_rows > admitted, 30, "the answer to start decoding", poll=0.01)
    wait_for(lambda: admission.held == 0, 30, "the server to see the client leave", poll=0.01)
    steps = batcher.steps
    metered.release(10_000)
    wait_for(lambda: batcher.dropped_rows > dropped, 20, "the abandoned row to be dropped", poll=0.01)
    assert batcher.steps - steps <= 2  # dropped at the next step, not after the 64 tokens it asked for
    time.sleep(0.2)
    assert not logged(agent, question)


def test_streamed_raw_completion_and_several_samples(client, agent):
    pieces = list(client.completions.create(model="default", prompt="Red, blue,", max_tokens=12, stream=True,
                                            logit_bias=no_eos(agent)))
    assert len(pieces) > 3 and pieces[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="default", messages=[*ask("Hi"), {"role": "assistant",
                                            "content": "Hello."}, *ask("Again?")], n=2, seed=3, max_tokens=8,
                                            stream=True)
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1}


def test_hot_swap_during_continuous_batching_fails_no_request(client, agent, tiny_model_dir, tmp_path):
    stop = threading.Event()
    swapped_at: list[float] = []
    outcomes: list[tuple[float, int | None, str | None]] = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if i % 2:
                    r = client.chat.completions.create(model="default", messages=ask(f"What is {i} + {i}?"),
                                                       max_tokens=16, extra_body={"s2agent": {"route": "system1"}})
                    version, error = r.model_extra["s2agent"]["adapter_version"], None
                else:
                    chunks = list(client.chat.completions.create(
                        model="default", messages=ask(f"Count to {i}."), max_tokens=16, stream=True,
                        extra_body={"s2agent": {"route": "system1"}}))
                    version, error = chunks[-1].model_extra["s2agent"]["adapter_version"], None
            except Exception as exc:  # noqa: BLE001 - counted
                version, error = None, repr(exc)
            with lock:
                outcomes.append((started, version, error))

    path = make_random_adapter(tiny_model_dir, tmp_path / "swap", seed=5)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(loop, i) for i in range(6)]
        time.sleep(1.0)
        version = agent.store.next_adapter_version()
        agent.store.register_adapter(version=version, path=str(path), parent=None)
        agent.store.promote_adapter(version)
        agent.refresh_adapters(force=True)
        swapped_at.append(time.monotonic())
        time.sleep(1.5)
        stop.set()
        for f in futures:
            f.result()
    try:
        assert [e for _, _, e in outcomes if e] == []
        after = [v for started, v, _ in outcomes if started > swapped_at[0]]
        assert after and all(v == version for v in after)
        assert any(started < swapped_at[0] for started, _, _ in outcomes)
    finally:
        agent.store.promote_adapter(version)  # leave it serving; the adapter test below names it
        agent.refresh_adapters(force=True)


# --- OpenAI conformance --------------------------------------------------------------------------------------
def test_logprobs_and_top_logprobs(client, agent):
    r = client.chat.completions.create(model="default", messages=ask("Name a colour."), max_tokens=6, logprobs=True,
                                       top_logprobs=3, logit_bias=no_eos(agent),
                                       extra_body={"s2agent": {"route": "system1"}})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert t.top_logprobs[0].logprob >= t.logprob  # greedy: the top alternative is the token itself
    plain = client.chat.completions.create(model="default", messages=ask("Name a colour."), max_tokens=6,
                                           extra_body={"s2agent": {"route": "system1"}})
    assert plain.choices[0].logprobs is None
    c = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5, logprobs=2,
                                  logit_bias=no_eos(agent))
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(alts) == 2 for alts in lp.top_logprobs)
    streamed = list(client.chat.completions.create(model="default", messages=ask("Name a colour."), max_tokens=4,
                                                   logprobs=True, stream=True,
                                                   extra_body={"s2agent": {"route": "system1"}}))
    finals = [ch for ch in streamed if ch.choices and ch.choices[0].finish_reason]
    assert finals[0].choices[0].logprobs.content  # a stream carries them in each choice's last chunk


def test_penalties_and_logit_bias_are_honoured_or_refused(client, agent):
    def text(**kw):
        return client.completions.create(model="default", prompt="apple house", max_tokens=12, **kw).choices[0].text

    plain = text()
    top = agent.backend.inner.tokenizer.encode(plain, add_special_tokens=False)[0]
    assert text(logit_bias={str(top): -100}) != plain
    assert text(frequency_penalty=2.0) != plain or text(presence_penalty=2.0) != plain
    with pytest.raises(BadRequestError) as bad:
        text(logit_bias={"x": 1})
    assert bad.value.body["param"] == "logit_bias"
    with pytest.raises(BadRequestError):
        text(logit_bias={str(top): 500})
    with pytest.raises(BadRequestError):
        text(presence_penalty=3.0)


def test_n_without_temperature_samples(client):
    r = client.chat.completions.create(model="default", messages=ask("Flip a coin."), n=2, seed=7, max_tokens=8)
    a, b = (c.message.content for c in r.choices)
    assert a != b  # OpenAI's default temperature, 1, for n > 1; greedy would give two identical copies


def test_model_naming_a_listed_adapter_serves_it(client, agent, tiny_model_dir, tmp_path):
    path = make_random_adapter(tiny_model_dir, tmp_path / "scoped", seed=9)
    version = agent.store.next_adapter_version()
    agent.store.register_adapter(version=version, path=str(path), parent=None, scope="arith")
    agent.store.promote_adapter(version)
    agent.refresh_adapters(force=True)
    name = f"{agent.model_name}:adapter-v{version}"
    assert name in [m.id for m in client.models.list().data]
    for stream in (False, True):
        r = client.chat.completions.create(model=name, messages=ask("What is 2 + 2?"), max_tokens=4, stream=stream,
                                           extra_body={"s2agent": {"route": "system1"}})
        last = list(r)[-1] if stream else r
        assert last.model == name and last.model_extra["s2agent"]["adapter_version"] == version
    default = client.chat.completions.create(model="default", messages=ask("What is 2 + 2?"), max_tokens=4,
                                             extra_body={"s2agent": {"route": "system1"}})
    assert default.model_extra["s2agent"]["adapter_version"] != version  # untagged: the general adapter
    c = client.completions.create(model=name, prompt="2 + 2 =", max_tokens=3)
    assert c.model_extra["s2agent"]["adapter_version"] == version
