"""Background System 2 (``system2.mode = "background"``) on the tiny real model and a real SQLite file.

The user gets System 1's answer at once; System 2 labels the query later from a bounded queue and the
example is stored exactly as the inline path stores it. A full queue drops and counts; ``close()`` stops the
workers. System 2 is a deterministic method that can be held at a gate, so the queue's states are exact.
"""

from __future__ import annotations

import threading

import pytest

from agent import Agent
from agent.background import Deferred, Label, System2Queue
from agent.backends import BACKGROUND, IDLE, INTERACTIVE
from agent.metrics import Metrics
from policies.lm import Call
from policies.system2 import METHODS
from policies.system2.base import Sample
from tests.agent.test_loop import Arithmetic
from tests.conftest import wait_for

QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(11, 23), range(40, 52))]


class Sums(Arithmetic):
    """``arith``, except that anything but a sum gets a majority too weak to keep: a rejected example."""

    def sample(self, query, lm, k):
        if "+" in query:
            return super().sample(query, lm, k)
        return [Sample(f"Answer: {a}", a, tokens=3) for a in ("red", "red", "blue", "green")[:k]], 1


class Gated(Arithmetic):
    """``arith`` that first makes one real model call, held until the test opens ``gate``."""

    name = "gated"
    gate = threading.Event()
    entered = threading.Event()
    asked: list[str] = []
    """The queries System 2 ran on, in order."""

    def sample(self, query, lm, k):
        Gated.asked.append(query)
        Gated.entered.set()
        assert Gated.gate.wait(30), "the test never opened the gate"
        generated = lm([Call((("user", query),), n=1, max_new_tokens=2)])
        samples, calls = super().sample(query, lm, k)
        for s in samples:
            s.tokens = generated[0][0].num_tokens
        return samples, calls + 1


@pytest.fixture
def config(tiny_config, monkeypatch):
    monkeypatch.setitem(METHODS, "arith", Sums)
    monkeypatch.setitem(METHODS, "gated", Gated)
    Gated.gate.clear()
    Gated.entered.clear()
    Gated.asked.clear()
    tiny_config.routing.threshold = 1.0  # the router sends every query to System 2
    tiny_config.system2.method = "arith"
    tiny_config.system2.mode = "background"
    return tiny_config


def test_background_answers_with_system1_and_stores_the_label_later(config):
    with Agent(config) as agent:
        answers = [agent.answer(q) for q in QUESTIONS[:3]]
        answers.append(agent.answer("Name a primary colour."))  # arith splits its votes: a rejected example
        for a in answers:
            assert a.route == "system1" and a.text == a.system1_text and a.method is None
            assert a.route_reason["system2"] == "queued" and a.votes is None and a.tokens_system2 == 0
        wait_for(lambda: agent.background_stats()["labelled"] == 4, what="the four labels")
        stats = agent.background_stats()
        assert stats == {"queued": 4, "dropped": 0, "labelled": 4, "accepted": 3, "skipped": 0, "failed": 0,
                         "tokens": 48, "waiting": 0}  # 4 samples x 3 tokens each

        examples = {e.input: e for e in agent.store.list_examples()}
        for a, q in zip(answers, [*QUESTIONS[:3], "Name a primary colour."]):
            example = examples[q]
            assert example.interaction_id == a.interaction_id  # linked to what the user was answered
            assert (example.method, example.kind) == ("arith", "system2")
            interaction = agent.store.get_interaction(a.interaction_id)  # what System 2 then spent and decided
            assert interaction.route == "system1" and interaction.route_reason["system2"] == "labelled"
            assert (interaction.method, interaction.tokens_system2) == ("arith", 12)
            # what each sample wrote is kept as inline: for audit, and for the variations of a consolidation
            samples = agent.store.sample_traces([a.interaction_id])[a.interaction_id]
            assert len(samples) == 4 and [s["answer"] for s in samples].count(example.target) >= 2
            assert interaction.accepted is (q != "Name a primary colour.") and interaction.votes == example.votes
        assert [examples[q].status for q in QUESTIONS[:3]] == ["pending"] * 3
        assert [examples[q].target for q in QUESTIONS[:3]] == ["51", "53", "55"]
        assert examples["Name a primary colour."].status == "rejected"
        assert examples["Name a primary colour."].votes == {"red": 2, "blue": 1, "green": 1}
        assert examples["Name a primary colour."].target == "red"
        counted = agent.store.stats()["interactions"]
        assert (counted["system2_runs"], counted["tokens_system2"], counted["system2_rate"]) == (4, 48, 0.0)

        # The inline path stores the same example for the same query: one recording function for both.
        config.system2.mode = "inline"
        inline = agent.answer(QUESTIONS[3])
        assert inline.route == "system2" and inline.text == "57" and "system2" not in inline.route_reason
        stored = agent.store.list_examples(status="pending")[-1]
        assert (stored.input, stored.target, stored.method, stored.interaction_id) == (
            QUESTIONS[3], "57", "arith", inline.interaction_id)
        # A request that asks for System 2 by name is answered inline even in background mode.
        config.system2.mode = "background"
        forced = agent.answer(QUESTIONS[4], route="system2")
        assert forced.route == "system2" and forced.text == "59"
        assert agent.background_stats()["queued"] == 4

        text = Metrics().render(None, agent.background_stats())
        assert 's2agent_system2_background_total{event="accepted"} 3' in text
        assert "s2agent_system2_background_tokens_total 48" in text
        assert 's2agent_tokens_generated_total{system="system2"} 48' in text  # all System 2 work, as inline
        assert "s2agent_system2_background_waiting 0" in text


def test_a_full_queue_drops_and_counts(config):
    config.system2.method = "gated"
    config.system2.queue_size = 2
    with Agent(config) as agent:
        first = agent.answer(QUESTIONS[0])
        assert Gated.entered.wait(10)  # the worker holds the first query at the gate: the queue is empty
        queued = [agent.answer(q) for q in QUESTIONS[1:3]]  # fills the queue (2)
        dropped = [agent.answer(q) for q in QUESTIONS[3:6]]
        assert [a.route_reason["system2"] for a in [first, *queued]] == ["queued"] * 3
        assert [a.route_reason["system2"] for a in dropped] == ["dropped"] * 3
        assert all(a.route == "system1" for a in [first, *queued, *dropped])
        assert agent.background_stats() | {"tokens": 0} == {
            "queued": 3, "dropped": 3, "labelled": 0, "accepted": 0, "skipped": 0, "failed": 0, "tokens": 0,
            "waiting": 2}
        assert agent.store.get_interaction(dropped[0].interaction_id).route_reason["system2"] == "dropped"

        Gated.gate.set()
        wait_for(lambda: agent.background_stats()["labelled"] == 3, what="the queued labels")
        assert sorted(e.input for e in agent.store.list_examples(status="pending")) == sorted(QUESTIONS[:3])
        assert agent.background_stats()["tokens"] > 0


def test_a_waiting_query_is_skipped_when_the_labels_done_meanwhile_say_system2_does_not_pay_off(config):
    """Six capitals queue while the first is held: the memory knows nothing yet, so all six are queued. Their
    labels fail one by one; after four failures the memory says skip, and the last two never run."""
    config.system2.method = "gated"  # arith's split votes on anything but a sum: every capital is rejected
    config.routing.memory_explore = 0.0
    capitals = [f"What is the capital of {c}?" for c in ("France", "Peru", "Japan", "Chile", "Kenya", "Nepal")]
    with Agent(config) as agent:
        answers = [agent.answer(q) for q in capitals]
        assert [a.route_reason["system2"] for a in answers] == ["queued"] * 6
        Gated.gate.set()
        wait_for(lambda: agent.background_stats()["waiting"] == 0 and
                 sum(agent.background_stats()[k] for k in ("labelled", "skipped")) == 6, what="the six turns")
        stats = agent.background_stats()
        assert (stats["labelled"], stats["accepted"], stats["skipped"]) == (4, 0, 2)
        rows = [agent.store.get_interaction(a.interaction_id) for a in answers]
        assert [r.route_reason["system2"] for r in rows] == ["labelled"] * 4 + ["skipped"] * 2
        assert rows[4].route_reason["memory"] == {"skip": True, "evidence": 4, "paid_off": 0, "explored": False,
                                                  "repeated": False}
        assert (rows[4].method, rows[4].tokens_system2) == (None, 0)  # no System 2 run is counted for it
        assert [(r.method, r.accepted) for r in rows[:4]] == [("gated", False)] * 4
        assert agent.store.stats()["interactions"]["system2_runs"] == 4
        text = Metrics().render(None, stats)
        assert 's2agent_system2_background_total{event="skipped"} 2' in text

        # A query queued to explore (the memory said skip, it was drawn to run anyway) is labelled at its turn.
        agent.routing_memory._loaded().explore = 1.0
        explored = agent.answer("What is the capital of Italy?")
        assert explored.route_reason["memory"]["explored"] and explored.route_reason["system2"] == "queued"
        wait_for(lambda: agent.background_stats()["labelled"] == 5, what="the explored label")
        assert agent.background_stats()["skipped"] == 2


def test_the_queue_alternates_the_best_ranked_and_the_oldest(config):
    """Every other turn takes the best ranked: a capital (System 2 always failed on them) the memory now skips
    first, then a sum (accepted before) before a kind never seen; the turns between take the oldest, so the
    kind never seen is not starved."""
    config.system2.method = "gated"
    config.routing.memory_explore = 0.0
    with Agent(config) as agent:
        agent.answer(QUESTIONS[2])
        assert Gated.entered.wait(10)  # held at the gate: the rest wait in the queue
        later = ["Sort these words: pear, apple, fig.", "Name a primary colour.", QUESTIONS[3],
                 "What is the capital of Kenya?"]
        for question in later:  # the memory knows nothing yet: all queued
            assert agent.answer(question).route_reason["system2"] == "queued"
        for country in ("France", "Peru", "Japan", "Chile"):  # meanwhile, labels (of another worker) taught it
            agent.routing_memory.record(f"What is the capital of {country}?", "gated", paid_off=False)
        for question in QUESTIONS[:2]:
            agent.routing_memory.record(question, "gated", paid_off=True)
        Gated.gate.set()
        wait_for(lambda: agent.background_stats()["waiting"] == 0 and
                 sum(agent.background_stats()[k] for k in ("labelled", "skipped")) == 5, what="every turn")
        # turns: the first (alone); ranked: Kenya skipped; oldest: sorting; ranked: the sum, ahead of the colour
        assert Gated.asked == [QUESTIONS[2], "Sort these words: pear, apple, fig.", QUESTIONS[3],
                               "Name a primary colour."]
        assert agent.background_stats()["skipped"] == 1


def test_close_stops_the_workers_and_drops_what_still_waits(config):
    config.system2.method = "gated"
    agent = Agent(config)
    for q in QUESTIONS[:4]:
        agent.answer(q)
    assert Gated.entered.wait(10)
    workers = [t for t in threading.enumerate() if t.name.startswith("system2-background")]
    assert len(workers) == config.system2.workers == 1

    closer = threading.Thread(target=agent.close)
    closer.start()
    wait_for(lambda: agent.background_stats()["dropped"] == 3, what="close() to drop the waiting queries")
    Gated.gate.set()  # the label in progress reaches its next model call, which the closing agent refuses
    closer.join(10)
    assert not closer.is_alive() and not any(t.is_alive() for t in workers)
    assert agent.background_stats() | {"tokens": 0} == {
        "queued": 4, "dropped": 3, "labelled": 0, "accepted": 0, "skipped": 0, "failed": 1, "tokens": 0,
        "waiting": 0}


def test_an_inline_agent_starts_no_worker(tiny_config, monkeypatch):
    monkeypatch.setitem(METHODS, "arith", Arithmetic)
    tiny_config.routing.threshold = 1.0
    tiny_config.system2.method = "arith"
    with Agent(tiny_config) as agent:
        assert agent.answer(QUESTIONS[0]).route == "system2"
        assert not [t for t in threading.enumerate() if t.name.startswith("system2-background")]
        assert agent.background_stats()["queued"] == 0


def test_background_labels_run_at_idle_priority_and_inline_ones_do_not(config, monkeypatch):
    """The engine gives background labels only the time serving leaves idle (``IDLE``); a user who waits
    for System 2 inline gets ``BACKGROUND``, ahead of them."""
    config.system2.method = "gated"
    Gated.gate.set()
    with Agent(config) as agent:
        seen: list[int] = []
        for name in ("generate", "submit"):
            real = getattr(agent.backend, name)

            def spy(requests, *args, _real=real, **kwargs):
                seen.extend(r.priority for r in (requests if isinstance(requests, list) else [requests]))
                return _real(requests, *args, **kwargs)

            monkeypatch.setattr(agent.backend, name, spy)
        agent.answer(QUESTIONS[0])
        wait_for(lambda: agent.background_stats()["labelled"] == 1, what="the label")
        labelled = list(seen)
        config.system2.mode = "inline"
        assert agent.answer(QUESTIONS[1]).route == "system2"
    assert labelled == [INTERACTIVE, IDLE]  # System 1's answer, then the label's one model call
    assert seen[len(labelled):] == [INTERACTIVE, BACKGROUND]


def test_a_queue_whose_ranking_fails_labels_in_arrival_order():
    labelled: list[str] = []

    def label(item: Deferred) -> Label:
        labelled.append(item.query)
        return Label(accepted=True, tokens=1)

    def broken(waiting):
        raise RuntimeError("a broken ranking")

    queue = System2Queue(size=8, workers=1, label=label, order=broken)
    items = [Deferred(f"query {i}", None, None, "", None, None) for i in range(3)]
    try:
        for item in items:  # none is logged yet: the worker holds the first it takes
            assert queue.offer(item)
        for item in items:
            item.logged(None)
        wait_for(lambda: queue.stats()["labelled"] == 3, what="three labels")
    finally:
        queue.close()
    assert labelled == ["query 0", "query 1", "query 2"]
