"""Who taught what, end to end on the tiny model: sources on interactions and examples, a source that may not
teach, per-source caps in a real consolidation, and purging a source after it trained an adapter."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from agent import Agent
from agent.auth import unnamed_source
from agent.config import AgentConfig
from agent.consolidation import uncapped_sources
from agent.scheduler import child_config_data
from agent.worker import child_config
from tests.fakes import QUESTIONS


@pytest.fixture
def learning_config(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # a random model is never this sure: every query goes to System 2
    c = tiny_config.consolidation
    c.min_examples, c.epochs, c.learning_rate, c.batch_size, c.rank = 4, 1, 1e-2, 8, 4
    c.retention_threshold, c.gate_margin, c.retention_prompts = 0.0, 1.0, 8  # a gate every candidate passes
    c.holdout_fraction = 0.0  # every example is a training candidate: the cap alone decides
    return tiny_config


def test_sources_are_recorded_and_a_source_without_teach_stores_no_example(learning_config):
    with Agent(learning_config) as agent:
        taught = agent.answer(QUESTIONS[0], source="alice")
        told = agent.answer(QUESTIONS[1], source="bob", teach=False)
        local = agent.answer(QUESTIONS[2])
        assert (taught.route, taught.accepted, told.route, told.accepted) == ("system2", True, "system2", True)
        assert told.text == "53"  # System 2 still answered it (12 + 41)
        sources = {i.input: i.source for i in agent.store.list_interactions()}
        assert sources == {QUESTIONS[0]: "alice", QUESTIONS[1]: "bob", QUESTIONS[2]: "local"}
        assert agent.store.get_interaction(told.interaction_id).route_reason["teach"] is False
        assert [(e.input, e.source) for e in agent.store.list_examples()] == [(QUESTIONS[0], "alice"),
                                                                              (QUESTIONS[2], "local")]
        assert agent.store.list_examples(source="bob") == []
        assert local.interaction_id and agent.store.list_examples(source="local")[0].interaction_id == local.interaction_id


def test_a_source_without_teach_does_not_shape_the_scopes(learning_config):
    learning_config.scoping.auto = True
    with Agent(learning_config) as agent:
        told = agent.answer(QUESTIONS[0], source="bob", teach=False)
        assert told.accepted and told.tag is None and "scope" not in told.route_reason
        taught = agent.answer(QUESTIONS[1], source="alice")
        assert taught.tag is not None and taught.route_reason["scope"]["assigned"] == "auto"


def test_background_labels_keep_the_source_and_skip_sources_that_may_not_teach(learning_config):
    learning_config.system2.mode = "background"
    with Agent(learning_config) as agent:
        queued = agent.answer(QUESTIONS[0], source="alice")
        skipped = agent.answer(QUESTIONS[1], source="bob", teach=False)
        assert queued.route_reason["system2"] == "queued"
        assert skipped.route_reason["system2"].startswith("not queued")
        deadline = time.monotonic() + 30
        while agent.background_stats()["labelled"] < 1:
            assert time.monotonic() < deadline, "the queued query was never labelled"
            time.sleep(0.02)
        assert [(e.input, e.source) for e in agent.store.list_examples()] == [(QUESTIONS[0], "alice")]


def test_no_source_is_more_than_its_share_of_a_consolidation(learning_config):
    learning_config.consolidation.max_source_share = 0.5
    learning_config.consolidation.uncapped_sources = ["carol"]
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:14]:
            agent.answer(q, source="mallory")
        for q in QUESTIONS[14:17]:
            agent.answer(q, source="alice")
        for q in QUESTIONS[17:19]:
            agent.answer(q)  # local: the operator's own, never capped
        for q in QUESTIONS[19:20]:
            agent.answer(q, source="carol")  # configured as uncapped
        dry = agent.consolidate(dry_run=True)
        assert (dry.n_new, dry.n_deferred) == (12, 8)
        report = agent.consolidate()
        assert report.status == "promoted", report.reason
        used = Counter(e.source for e in agent.store.list_examples(status="used"))
        assert used == {"mallory": 6, "alice": 3, "local": 2, "carol": 1}
        assert used["mallory"] <= 0.5 * report.n_new
        assert [e.input for e in agent.store.list_examples(status="pending")] == QUESTIONS[6:14]  # newest wait


def test_a_capped_source_alone_waits_for_others(learning_config):
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:8]:
            agent.answer(q, source="mallory")
        report = agent.consolidate()
        assert report.status == "skipped" and "8 more wait" in report.reason and report.n_deferred == 8
        assert agent.store.count_examples(status="pending") == 8 and agent.store.list_runs() == []


def test_purging_a_source_takes_its_examples_back_and_flags_the_adapter(learning_config):
    learning_config.consolidation.max_source_share = 1.0
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:6]:
            agent.answer(q, source="mallory")
        for q in QUESTIONS[6:10]:
            agent.answer(q, source="alice")
        assert agent.consolidate().status == "promoted"
        agent.answer(QUESTIONS[10], source="mallory")  # pending, for the next round
        report = agent.purge_source("mallory")
        assert (report.examples, report.by_status) == (7, {"used": 6, "pending": 1})
        assert report.adapters == report.serving == [1]
        assert agent.store.get_adapter(1).needs_retrain
        assert {e.source for e in agent.store.list_examples()} == {"alice"}
        assert agent.serving_version() == 1  # serving does not change by itself: roll back or retrain


def test_a_consolidation_child_gets_the_uncapped_names_but_no_secret(tmp_path):
    config = AgentConfig(db=str(tmp_path / "agent.db"))
    config.server.admin_token, config.server.api_key = "admin-secret", "ops-secret"
    config.server.api_keys = {"alice": {"key": "alice-secret", "rights": ["answer", "teach"]},
                              "root": {"key": "root-secret", "rights": ["admin"]}}
    config.consolidation.uncapped_sources = ["carol"]
    data = child_config_data(config)
    assert "secret" not in json.dumps(data)
    child = child_config(json.loads(json.dumps(data)))
    assert uncapped_sources(child) == uncapped_sources(config) == {
        None, "local", "anonymous", "carol", "root", unnamed_source("ops-secret")}
