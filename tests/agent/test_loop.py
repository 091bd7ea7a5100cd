"""The agent loop on a tiny real model: System 1, routing, System 2, the buffer, and thread safety.

System 2 here is the scripted :class:`tests.fakes.Arithmetic` method, registered the way users add one
(the ``arith`` fixture), so acceptance and rejection are exact; the System 1 side is a real model.
"""

from __future__ import annotations

import json
import threading

import pytest

from agent import Agent, Answer
from agent.cli import main as cli
from agent.config import ConfigError
from agent.loop import InvalidQueryError
from policies.system2 import METHODS
from tests.fakes import Arithmetic


def test_system1_answer_is_typed_and_logged(tiny_agent):
    answer = tiny_agent.answer("What is the capital of France?", route="system1")
    assert isinstance(answer, Answer)
    assert answer.route == "system1" and answer.method is None
    assert 0.0 <= answer.confidence <= 1.0
    assert answer.tokens == answer.tokens_system1 > 0
    assert answer.adapter_version is None
    assert answer.latency_ms > 0
    rows = tiny_agent.store.list_interactions()
    assert [r.id for r in rows] == [answer.interaction_id]
    assert rows[0].final_answer == answer.text and rows[0].route == "system1"


@pytest.mark.parametrize("query", ["", "   \n\t"])
def test_empty_query_is_refused_and_nothing_is_stored(tiny_agent, query):
    with pytest.raises(InvalidQueryError):
        tiny_agent.answer(query)
    assert tiny_agent.store.list_interactions() == []


def test_unknown_route_and_method_are_clear_errors(tiny_agent, tiny_config):
    with pytest.raises(InvalidQueryError, match="route"):
        tiny_agent.answer("hi", route="system3")
    tiny_config.system2.method = "nope"
    with pytest.raises(ConfigError, match=r"'system2.method' \(from code\) must be one of .*cot.*; got 'nope'"):
        Agent(tiny_config)


def test_uncertain_query_goes_to_system2_and_accepted_answer_joins_buffer(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # the random model is never this sure: route everything
    with Agent(tiny_config) as agent:
        answer = agent.answer("What is 47 + 38?")
        assert answer.route == "system2" and answer.method == "arith"
        assert answer.text == "85" and answer.accepted is True
        assert answer.votes == {"85": 4} and answer.agreement == 1.0
        assert answer.tokens == answer.tokens_system1 + answer.tokens_system2
        assert answer.route_reason["estimator"] == "logprob" and answer.route_reason["threshold"] == 1.0
        [example] = agent.store.list_examples()
        assert (example.input, example.target, example.status) == ("What is 47 + 38?", "85", "pending")
        assert example.interaction_id == answer.interaction_id
        # the same input again is answered but not added twice
        agent.answer("What is 47 + 38?")
        assert agent.store.count_examples() == 1


def test_inconsistent_system2_is_recorded_as_rejected(tiny_config, arith):
    tiny_config.system2.method = "arith"
    with Agent(tiny_config) as agent:
        answer = agent.answer("Name a colour", route="system2")
        assert answer.accepted is False
        assert answer.votes == {"0": 2, "1": 2}
        assert agent.store.count_examples(status="pending") == 0


def test_confident_system1_stays_on_system1(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 0.0
    with Agent(tiny_config) as agent:
        answer = agent.answer("What is 1 + 1?")
        assert answer.route == "system1" and answer.method is None
        assert agent.store.count_examples() == 0


def test_an_adapter_answers_alone_only_above_the_threshold_its_gate_calibrated(tiny_config, arith, tiny_model_dir,
                                                                              tmp_path):
    """The records of an adapter's gate (``routing_records``, ``routing.takeover_precision``) raise the bar for
    the inputs it serves, not for the others."""
    from tests.conftest import make_random_adapter

    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 0.0  # alone, every answer of the random model stands
    with Agent(tiny_config) as agent:
        path = make_random_adapter(tiny_model_dir, tmp_path / "sums")
        agent.store.register_adapter(version=1, path=str(path), parent=None, scope="sums",  # its gate's records:
                                     metrics={"routing_records": [[0.0, False]] * 5})  # wrong wherever it was sure
        agent.store.promote_adapter(1)
        agent.refresh_adapters(force=True)
        sums = agent.answer("What is 1 + 1?", tag="sums")
        assert (sums.adapter_version, sums.route, sums.method) == (1, "system2", "arith")
        assert sums.route_reason["threshold"] > 1.0
        other = agent.answer("What is 1 + 1?", tag="colours")  # the base model serves it: the configured 0.0
        assert (other.adapter_version, other.route, other.route_reason["threshold"]) == (None, "system1", 0.0)


def test_system2_is_skipped_for_inputs_like_its_failures_and_the_memory_survives_a_restart(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # System 1 is never sure: without the memory, everything goes to System 2
    tiny_config.routing.memory_explore = 0.0
    capitals = [f"What is the capital of {c}?" for c in ("France", "Peru", "Japan", "Chile", "Kenya", "Nepal")]
    with Agent(tiny_config) as agent:
        for question in capitals[:3]:  # arith splits its votes on these: rejected
            assert agent.answer(question).method == "arith"
        # a source that may not teach runs System 2 as usual, but its outcome is no evidence for anyone
        assert agent.answer("What is the capital of Spain?", source="anonymous", teach=False).method == "arith"
        assert agent.answer(capitals[3]).method == "arith"  # the fourth failure
        skipped = agent.answer(capitals[4])
        assert skipped.route == "system1" and skipped.method is None and skipped.tokens_system2 == 0
        assert skipped.route_reason["system2"] == "skipped"
        assert skipped.route_reason["memory"] == {"skip": True, "evidence": 4, "paid_off": 0, "explored": False,
                                                  "repeated": False}
        assert agent.answer("What is 47 + 38?").route == "system2"  # sums pay off: still System 2
        assert agent.answer(capitals[4], route="system2").method == "arith"  # asked for: it runs
        assert agent.routing_memory.stats() == {"skipped": 1, "explored": 0, "recorded": 6}
        again = agent.answer(capitals[0])  # asked again after System 2 failed on it: skipped at once
        assert again.route_reason["system2"] == "skipped" and again.route_reason["memory"]["repeated"]
        examples = agent.store.count_examples()
    with Agent(tiny_config) as agent:  # rebuilt from the store: the first similar question costs nothing
        assert agent.answer(capitals[5]).route_reason["system2"] == "skipped"
        assert agent.store.count_examples() == examples
    tiny_config.system2.method = "arith2"  # another method has no failures here: it is tried
    METHODS["arith2"] = Arithmetic
    try:
        with Agent(tiny_config) as agent:
            tried = agent.answer(capitals[5])
            assert tried.route_reason["asked"] == "arith2" and tried.votes is not None
    finally:
        del METHODS["arith2"]


def test_the_memory_can_be_turned_off(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0
    tiny_config.routing.memory = False
    with Agent(tiny_config) as agent:
        answers = [agent.answer(f"Name a colour like {c}") for c in ("red", "blue", "green", "pink", "grey", "teal")]
        assert all(a.method == "arith" for a in answers)


def test_failing_system2_falls_back_to_system1(tiny_config, monkeypatch):
    class Broken(Arithmetic):
        def sample(self, query, lm, k):
            raise RuntimeError("boom")

    monkeypatch.setitem(METHODS, "broken", Broken)
    tiny_config.system2.method = "broken"
    with Agent(tiny_config) as agent:
        answer = agent.answer("What is 1 + 1?", route="system2")
        assert answer.route == "system1" and answer.text == answer.system1_text
        assert "boom" in answer.error
        assert agent.store.list_interactions()[0].error == answer.error


def test_real_system2_method_runs_on_the_model(tiny_agent):
    """Chain-of-thought on a random model: the outputs are unparsable, so they are rejected votes, not a crash."""
    answer = tiny_agent.answer("What is 2 + 2?", route="system2", method="cot")
    assert answer.method == "cot"
    assert sum(answer.votes.values()) == tiny_agent.config.system2.samples
    assert answer.tokens_system2 > 0 and answer.system2_calls >= 1


def test_concurrent_answers_are_all_served_and_logged(tiny_agent):
    questions = [f"What is {i} + {i}?" for i in range(8)]
    answers: dict[str, Answer] = {}
    errors: list[BaseException] = []

    def ask(q: str) -> None:
        try:
            answers[q] = tiny_agent.answer(q, route="system1")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(answers) == sorted(questions)
    for q in questions:  # batched answers equal sequential ones (greedy)
        assert tiny_agent.answer(q, route="system1").text == answers[q].text
    assert len(tiny_agent.store.list_interactions(limit=100)) == 16
    assert tiny_agent.backend.prefills < 16


def test_write_behind_queues_system1_logs_and_writes_system2_answers_at_once(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # every auto query goes to System 2
    with Agent(tiny_config) as agent:
        writer = agent.start_write_behind()
        plain = [agent.answer(f"Say {i}.", route="system1") for i in range(20)]
        labelled = agent.answer("What is 12 + 30?")
        assert all(a.interaction_id is None for a in plain)  # queued: no id yet
        # System 2's interaction and its example are committed before the answer returns.
        assert labelled.interaction_id is not None and writer.stats.written + writer.queued == 20
        [example] = agent.store.list_examples()
        assert (example.interaction_id, example.target, example.status) == (labelled.interaction_id, "42", "pending")
        assert agent.stats()["interactions"]["total"] == 21  # the façade's reads flush the queue first
        assert writer.queued == 0 and writer.stats.written == 20


def test_what_system2_wrote_is_kept_for_audit_with_the_example(tiny_config, arith, capsys):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0
    with Agent(tiny_config) as agent:
        answer = agent.answer("What is 47 + 38?")
        [example] = agent.store.list_examples()
    assert cli(["--db", tiny_config.db, "store", "show", str(example.id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["interaction_id"] == answer.interaction_id
    assert shown["samples"] == [{"answer": "85", "trace": "Answer: 85"}] * 4
