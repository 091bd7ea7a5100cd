"""Scoped adapters (opt-in): an adapter trained on one task tag's examples serves only that tag.

Tiny real model, real SQLite file, real training; System 2 is the scripted ``tests.fakes.Arithmetic`` method.
"""

from __future__ import annotations

import json
import time

import pytest

from agent import Agent
from agent.cli import main as cli
from tests.fakes import QUESTIONS, make_config


@pytest.fixture
def config(tiny_model_dir, tmp_path, arith):
    return make_config(tiny_model_dir, tmp_path / "agent.db")


def _answer_tagged(agent: Agent, questions: list[str], tag: str) -> None:
    for q in questions:
        assert agent.answer(q, tag=tag).route == "system2"


def test_a_scoped_adapter_learns_and_serves_only_its_tag(config, capsys):
    with Agent(config) as agent:
        _answer_tagged(agent, QUESTIONS[:16], "arith")
        for q in QUESTIONS[16:]:
            agent.answer(q)  # untagged
        for q in QUESTIONS[:6]:
            agent.answer(q, tag="other")  # the same questions under another tag are other examples
        assert {e.tag for e in agent.store.list_examples()} == {"arith", None, "other"}
        assert agent.store.count_examples(status="pending", tag="arith") == 16

        report = agent.consolidate(scope="arith")
        assert report.status == "promoted", report.reason
        assert report.scope == "arith" and report.n_new + report.n_holdout == 16
        [adapter] = agent.store.list_adapters()
        assert (adapter.version, adapter.scope, adapter.serving) == (report.adapter_version, "arith", True)
        assert agent.store.last_run().scope == "arith"
        # it trained on the arith examples only; the others wait for their own consolidation
        assert {e.tag for e in agent.store.list_examples(status=["used", "holdout"])} == {"arith"}
        assert agent.store.count_examples(status="used") == report.n_new
        assert agent.store.count_examples(status="pending", tag="other") == 6
        assert agent.store.count_examples(status="pending") == 6 + len(QUESTIONS[16:])

        assert agent.answer("What is 2 + 3?", tag="arith", route="system1").adapter_version == adapter.version
        assert agent.answer("What is 2 + 3?", route="system1").adapter_version is None  # the base model
        assert agent.answer("What is 2 + 3?", tag="other", route="system1").adapter_version is None
        assert agent.serving_version("arith") == adapter.version and agent.serving_version() is None

    capsys.readouterr()
    assert cli(["--db", config.db, "adapters", "ls", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["version"], row["scope"], row["serving"], row["status"]) == (adapter.version, "arith", True, "promoted")
    assert cli(["--db", config.db, "adapters", "ls"]) == 0
    assert "arith" in capsys.readouterr().out


def test_the_scope_classifier_sends_untagged_lookalikes_to_the_scoped_adapter(config):
    config.scoping.classifier = True
    with Agent(config) as agent:
        _answer_tagged(agent, QUESTIONS[:16], "arith")
        assert agent.answer("What is 71 + 5?", route="system1").tag is None  # no scoped adapter yet
        report = agent.consolidate(scope="arith")
        assert report.status == "promoted", report.reason

        lookalike = agent.answer("What is 71 + 5?", route="system1")
        assert (lookalike.tag, lookalike.adapter_version) == ("arith", report.adapter_version)
        assert lookalike.route_reason["scope"]["similarity"] >= config.scoping.min_similarity
        assert agent.store.get_interaction(lookalike.interaction_id).tag == "arith"

        general = agent.answer("Name a primary colour.", route="system1")
        assert (general.tag, general.adapter_version) == (None, None)
        assert general.route_reason["scope"]["general_similarity"] > general.route_reason["scope"]["similarity"]


def test_per_tag_scheduler_trains_one_scoped_adapter_per_tag(config):
    config.consolidation.per_tag = True
    config.scheduler.min_pending = 6
    config.scheduler.check_seconds = 0.2
    with Agent(config) as agent:
        for q in QUESTIONS[:10]:
            agent.answer(q, tag="arith")
        for q in QUESTIONS[10:20]:
            agent.answer(q, tag="sums")
        for q in QUESTIONS[20:23]:
            agent.answer(q)  # 3 untagged: below min_pending, no general run
        scheduler = agent.start_scheduler()
        deadline = time.monotonic() + 60
        while not ({a.scope for a in agent.store.list_adapters() if a.serving} == {"arith", "sums"}
                   and not scheduler.running):
            assert time.monotonic() < deadline, "the per-tag runs did not both promote within 60 s"
            time.sleep(0.1)
        scheduler.shutdown()

        runs = sorted(agent.store.list_runs(), key=lambda r: r.id)
        assert [(r.scope, r.status) for r in runs] == [("arith", "promoted"), ("sums", "promoted")]
        assert runs[0].finished_at <= runs[1].started_at  # one after the other, never together
        adapters = {a.scope: a for a in agent.store.list_adapters()}
        for tag, adapter in adapters.items():  # each adapter learned its own tag's examples, and only those
            trained_on = agent.store.list_examples(status="used", tag=tag)
            assert trained_on and {e.adapter_version for e in trained_on} == {adapter.version}
            assert agent.answer(QUESTIONS[0], tag=tag, route="system1").adapter_version == adapter.version
        assert agent.store.count_examples(status="pending") == 3 and agent.serving_version() is None

        # The general run of a per-tag store takes the untagged examples only: here too few of them.
        general = agent.consolidate()
        assert general.status == "skipped" and general.n_new <= 3


def test_general_retention_gates_the_general_adapter_but_not_a_scoped_one(config):
    """A scoped adapter never answers general prompts, so losing them is reported, not a rejection."""
    config.consolidation.retention_threshold = 0.99
    config.consolidation.retention_ratio = 0.0
    config.consolidation.gate_margin = 0.0
    config.consolidation.epochs = 4
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q, tag="arith")
            agent.answer(q.replace("What is", "Compute"))  # untagged: for the general adapter
        scoped = agent.consolidate(scope="arith")
        general = agent.consolidate()
    assert scoped.metrics["retention_likelihood"] < 0.99 and general.metrics["retention_likelihood"] < 0.99
    assert "retention" not in scoped.metrics  # a scoped run does not regenerate the text answers it never gates
    assert scoped.status == "promoted" and "not gated" in scoped.reason
    assert general.status == "rejected" and "retention" in general.reason



@pytest.mark.parametrize("scoped_ratio", [0.0, 1.0])
def test_a_scoped_run_trains_retention_data_only_when_asked(config, scoped_ratio):
    """``scoped_retention_ratio`` (0 by default) sets a scoped run's retention data; ``retention_ratio`` the
    general adapter's. Retention is reported for both."""
    config.consolidation.retention_ratio = 1.0 - scoped_ratio
    config.consolidation.scoped_retention_ratio = scoped_ratio
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q, tag="arith")
        scoped = agent.consolidate(scope="arith", dry_run=True)
        assert (scoped.n_retention > 0) == bool(scoped_ratio)
        report = agent.consolidate(scope="arith")
    assert report.n_retention == len(report.metrics["retention_trained"]) == scoped.n_retention
    assert report.n_retention_holdout > 0 and "retention_likelihood" in report.metrics

def test_untagged_traffic_groups_itself_into_a_scope_that_learns_and_serves(config, capsys):
    """No tag anywhere: accepted sums form a scope by themselves, it gets its own adapter, and new sums
    are served by it while a general question stays on the base model."""
    config.scoping.auto = True
    with Agent(config) as agent:
        answers = [agent.answer(q) for q in QUESTIONS[:16]]
        assert {a.tag for a in answers} == {"n-plus-n"}
        assert all(a.route_reason["scope"]["assigned"] == "auto" for a in answers)
        assert agent.store.count_examples(status="pending", tag="n-plus-n") == 16
        assert agent.store.get_interaction(answers[0].interaction_id).tag == "n-plus-n"

        report = agent.consolidate(scope="n-plus-n")
        assert report.status == "promoted", report.reason
        lookalike = agent.answer("What is 71 + 5?", route="system1")
        assert (lookalike.tag, lookalike.adapter_version) == ("n-plus-n", report.adapter_version)
        general = agent.answer("Name a primary colour.", route="system1")
        assert (general.tag, general.adapter_version) == (None, None)

    capsys.readouterr()
    assert cli(["--db", config.db, "scopes", "rename", "n-plus-n", "sums"]) == 0
    assert "renamed scope 'n-plus-n' into 'sums'" in capsys.readouterr().out
    assert cli(["--db", config.db, "scopes", "ls", "--json"]) == 0
    [scope] = json.loads(capsys.readouterr().out)
    assert (scope["scope"], scope["serving_version"]) == ("sums", report.adapter_version)
    assert sum(scope["examples"].values()) == 16
    with Agent(config) as agent:  # the renamed scope keeps serving, under its new name
        assert agent.answer("What is 71 + 5?", route="system1").tag == "sums"


def test_a_new_phrasing_joins_the_scope_whose_solutions_have_its_shape(config):
    config.scoping.auto = True
    with Agent(config) as agent:
        first = agent.answer("What is 12 + 30?")
        other = agent.answer("Kindly sum up 47 + 38 for me, my friend.")  # unlike in text; solved alike
        assert first.tag == other.tag == "n-plus-n"
        assert other.route_reason["scope"]["similarity"] >= 0.9
        assert agent.store.count_examples(status="pending", tag="n-plus-n") == 2


def test_a_pinned_scope_keeps_its_adapter_while_the_others_learn(config, capsys):
    config.consolidation.per_tag = True
    config.scheduler.min_pending = 6
    config.scheduler.check_seconds = 0.2
    with Agent(config) as agent:
        for q in QUESTIONS[:10]:
            agent.answer(q, tag="arith")
        for q in QUESTIONS[10:20]:
            agent.answer(q, tag="sums")
        assert cli(["--db", config.db, "scopes", "pin", "sums", "--reason", "audited"]) == 0
        assert "pinned scope 'sums'" in capsys.readouterr().out
        report = agent.consolidate(scope="sums")  # a manual run is refused too
        assert report.status == "skipped" and "pinned" in report.reason
        scheduler = agent.start_scheduler()
        deadline = time.monotonic() + 60
        while not (agent.serving_version("arith") and not scheduler.running):
            assert time.monotonic() < deadline, "the unpinned scope did not learn within 60 s"
            time.sleep(0.1)
        time.sleep(1.0)  # several more checks: the pinned scope, 10 pending, still does not run
        scheduler.shutdown()
        assert [r.scope for r in agent.store.list_runs()] == ["arith"]
        assert agent.serving_version("sums") is None and agent.store.count_examples(status="pending", tag="sums") == 10
        assert cli(["--db", config.db, "scopes", "ls", "--json"]) == 0
        flags = {s["scope"]: s["pinned"] for s in json.loads(capsys.readouterr().out)}
        assert flags == {"arith": False, "sums": True}
        assert cli(["--db", config.db, "scopes", "unpin", "sums"]) == 0
        assert agent.consolidate(scope="sums").status == "promoted"
