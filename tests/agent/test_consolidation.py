"""Consolidation on a tiny real model: the whole learning loop, the gate, and failure paths.

The first test is the loop a newcomer should read: queries come in, System 2 answers them, the
store keeps the consistent answers, consolidation trains and gates a LoRA adapter, and System 1,
now served with it, answers as System 2 taught.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import text

from agent import Agent
from agent.metrics import Metrics, store_snapshot
from tests.fakes import QUESTIONS

TAUGHT = [f"What is {a} + {85 - a}?" for a in range(11, 35)]
"""24 questions System 2 answers "85": one short answer, which the 2-layer random model learns in two epochs
(24 distinct sums would take it far longer), so the loop's test can see System 1 learn it."""
UNSEEN = [f"What is {a} + {85 - a}?" for a in range(40, 50)]


@pytest.fixture
def learning_config(tiny_config, arith):
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # a random model is never this sure: every query goes to System 2
    c = tiny_config.consolidation
    c.min_examples, c.epochs, c.learning_rate, c.batch_size, c.rank = 4, 2, 1e-2, 8, 4
    c.retention_threshold = 0.0  # a random model has no behaviour worth retaining; see the retention tests
    return tiny_config


def match_rate(agent: Agent, questions: list[str], target: str = "85") -> float:
    """The share of ``questions`` that System 1 (greedy, with the adapter now serving) answers with ``target``."""
    return sum(c.text.strip() == target for c in agent.system1_batch(questions)) / len(questions)


def test_learning_loop_end_to_end(learning_config):
    with Agent(learning_config) as agent:
        # 0. System 1, the base model alone, does not know the answer.
        assert match_rate(agent, TAUGHT) == 0.0

        # 1. System 2 answers uncertain queries; consistent answers become pending examples.
        for q in TAUGHT:
            answer = agent.answer(q)
            assert (answer.route, answer.text, answer.accepted) == ("system2", "85", True)
        assert agent.store.count_examples(status="pending") == len(TAUGHT)

        # 2. Consolidation trains, gates and promotes a LoRA adapter; the gate saw it do better.
        report = agent.consolidate()
        assert report.status == "promoted", report.reason
        assert report.adapter_version == 1 and report.parent_version is None
        assert report.n_new + report.n_holdout == len(TAUGHT) and report.n_holdout > 0
        assert report.metrics["train_steps"] > 0 and "retention" in report.metrics
        assert report.metrics["holdout_accuracy_candidate"] > report.metrics["holdout_accuracy_serving"]

        # 3. The registry, the adapter files and the buffer agree.
        [adapter] = agent.store.list_adapters()
        assert adapter.serving and adapter.status == "promoted"
        files = {p.name for p in (agent.config.adapters_path() / "v1").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not list(agent.config.adapters_path().glob(".tmp-*"))
        used = agent.store.list_examples(status="used")
        assert len(used) == report.n_new and {e.adapter_version for e in used} == {1}
        held_out = agent.store.list_examples(status="holdout")
        assert len(held_out) == report.n_holdout
        run = agent.store.last_run()
        assert run.status == "promoted" and run.adapter_version == 1

        # 4. Without a restart, System 1 is served by the new adapter and says what System 2 taught: on the
        #    inputs it trained on, on the held-out ones, and on questions it never saw.
        assert agent.answer("What is 40 + 45?", route="system1").adapter_version == 1
        assert match_rate(agent, [e.input for e in used]) >= 0.5
        assert match_rate(agent, [e.input for e in held_out]) >= 0.5
        assert match_rate(agent, UNSEEN) >= 0.5


def test_an_adapter_promoted_over_a_base_that_knew_nothing_answers_alone_only_where_its_holdout_was_right(
        learning_config):
    """The gate compares a candidate with what serves; a scope's first candidate beats the base model even when it
    learned little. Its own held-out answers then set how sure it must be to answer alone
    (``routing.takeover_precision``): here it learned nothing, so it answers nothing alone."""
    learning_config.routing.threshold = 0.0  # alone, every answer of System 1 would stand
    c = learning_config.consolidation
    c.learning_rate, c.epochs, c.holdout_fraction = 1e-9, 1, 0.5  # trains nothing; half held out, to calibrate on
    with Agent(learning_config) as agent:
        for q in TAUGHT:
            agent.store.add_example(q, "85", method="arith", agreement=1.0)
        report = agent.consolidate()
        assert report.status == "promoted", report.reason  # 0.00 -> 0.00 is not worse than the base model
        assert report.metrics["holdout_accuracy_candidate"] == 0.0 and report.n_holdout >= 5
        assert report.metrics["routing_threshold"] > 1.0 and "answers nothing alone yet" in report.reason
        assert len(report.metrics["routing_records"]) == report.n_holdout  # what serving starts from
        answer = agent.answer(UNSEEN[0])
        assert (answer.adapter_version, answer.route, answer.text) == (1, "system2", "85")



def test_an_adapter_with_no_held_out_answers_waits_for_system2_to_check_its_own(learning_config):
    """Nothing to calibrate on (here no holdout at all; in a live replay one held-out word): it answers nothing
    alone until System 2 has agreed with 5 of its answers (``policies.routing.MIN_CALIBRATION_RECORDS``)."""
    learning_config.routing.threshold = 0.0  # alone, every answer of System 1 would stand
    learning_config.consolidation.holdout_fraction = 0.0
    with Agent(learning_config) as agent:
        for q in TAUGHT:
            agent.store.add_example(q, "85", method="arith", agreement=1.0)
        report = agent.consolidate()
        assert report.status == "promoted" and report.n_holdout == 0
        assert report.metrics["routing_records"] == [] and "until System 2 has checked" in report.reason
        routes = [agent.answer(q) for q in UNSEEN[:6]]
        assert {a.adapter_version for a in routes} == {1} and {a.text for a in routes} == {"85"}
        assert [a.route for a in routes] == ["system2"] * 5 + ["system1"]  # 5 agreeing checks, then alone

def test_an_adapter_unsure_at_promotion_takes_over_as_system2_confirms_its_answers(learning_config):
    """Each input it serves that System 2 still answers is one more record of whether its own answer was right
    (``policies.routing.TakeoverEvidence``): once 5 of them agree at a confidence, it answers alone there."""
    learning_config.routing.threshold = 0.0
    with Agent(learning_config) as agent:
        for q in TAUGHT:
            agent.store.add_example(q, "85", method="arith", agreement=1.0)
        assert agent.consolidate().status == "promoted"  # v1 says "85" to these sums
        # The same weights as v2, promoted by a gate whose held-out answers were all wrong: nothing alone.
        agent.store.register_adapter(version=2, path=str(agent.config.adapters_path() / "v1"), parent=1,
                                     metrics={"routing_records": [[0.0, False]] * 5})
        agent.store.promote_adapter(2)
        agent.refresh_adapters(force=True)
        routes = [agent.answer(UNSEEN[0]) for _ in range(6)]
        assert [a.adapter_version for a in routes] == [2] * 6 and {a.text for a in routes} == {"85"}
        assert [a.route for a in routes] == ["system2"] * 5 + ["system1"]  # 5 confirmations, then alone
        assert routes[-1].route_reason["threshold"] == routes[-1].confidence > 0.0
        assert agent.takeover() == {None: {"version": 2, "threshold": routes[-1].confidence, "records": 10}}
        text = Metrics().render(store_snapshot(agent))
        assert f's2agent_takeover_threshold{{scope="general"}} {routes[-1].confidence}' in text
        assert 's2agent_takeover_records{scope="general"} 10' in text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # about the adapter's weights, not the store
def test_the_general_adapter_serves_the_configured_share_of_its_update(learning_config, tmp_path):
    """The same run at ``general_update_scale`` 1 and 0.5: the same ``lora_A``, half of every ``lora_B``, so
    half of every layer's weight change ``B @ A``; the gate and serving see the scaled adapter."""
    weights = {}
    for scale in (1.0, 0.5):
        config = copy.deepcopy(learning_config)
        config.db, config.adapters_dir = str(tmp_path / f"{scale}.db"), str(tmp_path / f"adapters-{scale}")
        config.consolidation.general_update_scale = scale
        with Agent(config) as agent:
            for q in TAUGHT:
                agent.store.add_example(q, "85", method="arith", agreement=1.0)
            report = agent.consolidate()
            assert report.status == "promoted", report.reason
            assert report.metrics.get("update_scale") == (None if scale == 1.0 else 0.5)
            weights[scale] = load_file(str(config.adapters_path() / "v1" / "adapter_model.safetensors"))
    whole, half = weights[1.0], weights[0.5]
    assert whole.keys() == half.keys() and any("lora_B" in k for k in whole)
    for key in whole:
        expected = whole[key] * 0.5 if "lora_B" in key else whole[key]
        assert torch.allclose(half[key], expected, atol=1e-6), key


def test_dry_run_and_min_examples_change_nothing(learning_config):
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:6]:
            agent.answer(q)
        dry = agent.consolidate(dry_run=True)
        assert dry.status == "dry-run" and len(dry.train_preview) == dry.n_new
        assert {p["source"] for p in dry.train_preview} == {"new"}
        skipped = agent.consolidate(min_examples=100)
        assert skipped.status == "skipped" and "fewer than" in skipped.reason
        assert agent.store.count_examples(status="pending") == 6
        assert agent.store.list_adapters() == [] and agent.store.list_runs() == []


def test_diverging_training_leaves_serving_untouched(learning_config):
    learning_config.consolidation.learning_rate = 1e30  # weights overflow: the loss becomes NaN
    with Agent(learning_config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate()
        assert report.status == "failed" and "diverged" in report.reason
        assert agent.store.list_adapters() == []
        assert agent.store.last_run().status == "failed"
        # no adapter folder left; only the serving model's answers, kept for the next run
        assert [p.name for p in agent.config.adapters_path().glob("*")] == ["serving-answers.json"]
        assert agent.store.count_examples(status="used") == 0
        assert agent.store.count_examples(status="pending") == report.n_new


def test_gate_rejects_an_adapter_that_breaks_retention(learning_config):
    learning_config.consolidation.retention_threshold = 0.9
    learning_config.consolidation.retention_ratio = 0.0
    learning_config.consolidation.epochs = 4
    with Agent(learning_config) as agent:
        before = agent.answer("What is the capital of France?", route="system1").text
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate()
        assert report.status == "rejected"
        assert report.metrics["retention"] < 0.9
        assert "retention" in report.reason and "holdout accuracy" in report.reason
        assert agent.store.get_adapter(report.adapter_version).status == "rejected"
        assert agent.serving_version() is None
        assert agent.answer("What is the capital of France?", route="system1").text == before
        assert agent.store.count_examples(status="pending") == report.n_new  # kept for the next run


@pytest.mark.parametrize("retention_ratio", [0.0, 1.0])
def test_retention_data_keeps_what_system1_already_does(learning_config, polite_model_dir, retention_ratio):
    """The model answers general prompts "Sure."; training on sums alone erases that, and the gate
    rejects the adapter; with its own answers mixed in, held-out general prompts keep "Sure.". Both
    retention measures (regenerated text, likelihood) agree here."""
    learning_config.model = str(polite_model_dir)
    c = learning_config.consolidation
    c.retention_threshold, c.retention_ratio, c.epochs = 0.9, retention_ratio, 4
    with Agent(learning_config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate()
        assert report.n_retention_holdout >= 16
        trained = report.metrics["retention_trained"]  # kept with the adapter's metrics
        assert len(trained) == report.n_retention and all(isinstance(p, str) and p for p in trained)
        if retention_ratio == 0.0:
            assert report.n_retention == 0
            assert report.status == "rejected" and report.metrics["retention"] < 0.5, report.reason
            assert report.metrics["retention_likelihood"] < 0.5 and "retention" in report.reason
        else:
            assert report.n_retention >= 16
            assert report.status == "promoted" and report.metrics["retention"] >= 0.9, report.reason
            assert report.metrics["retention_likelihood"] >= 0.9  # what the gate used (the default measure)
            assert agent.answer("Name a fruit that is red.", route="system1").text == "Sure."


def test_rollback_and_corrupt_adapter(learning_config):
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:12]:
            agent.answer(q)
        assert agent.consolidate().status == "promoted"
        for q in QUESTIONS[12:]:
            agent.answer(q)
        assert agent.consolidate(min_examples=4).status == "promoted"
        assert agent.serving_version() == 2

        agent.store.rollback()  # e.g. `agent adapters rollback` from another process
        agent.refresh_adapters(force=True)
        assert agent.serving_version() == 1
        assert agent.answer("What is 1 + 2?", route="system1").adapter_version == 1

        # a damaged adapter folder is fetched again from the store's copy, checked by sha256
        v2 = agent.store.get_adapter(2)
        weights = agent.config.adapters_path() / "v2" / "adapter_model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(b"garbage")
        agent.store.rollback(2)
        agent.refresh_adapters(force=True)
        assert v2.path.endswith("v2") and weights.read_bytes() == good
        assert agent.serving_version() == 2

        # when the store's copy is damaged too, the adapter is refused at load; the previous one keeps serving
        agent.store.rollback(1)
        agent.refresh_adapters(force=True)
        weights.write_bytes(b"garbage")
        with agent.store.engine.begin() as conn:
            conn.execute(text("UPDATE adapter_blobs SET data = :junk WHERE sha256 = :sha"),
                         {"junk": b"junk", "sha": agent.store.adapter_manifest(2)["adapter_model.safetensors"]})
        agent.store.rollback(2)
        agent.refresh_adapters(force=True)
        assert agent.serving_version() == 1
        assert agent.answer("What is 1 + 2?", route="system1").adapter_version == 1


def test_a_run_answers_only_the_retention_prompts_it_reads():
    from agent.consolidation import _retention_prompts_used, split_retention

    prompts = [f"Tell me about topic number {i}." for i in range(40)]
    _, holdout = split_retention(prompts, ["Sure."] * 40, seed=0)
    used = _retention_prompts_used(prompts, 3, False, seed=0)
    assert len(used) == len(holdout) + 3 and {p for p, _ in holdout} <= set(used)
    assert used == [p for p in prompts if p in set(used)]  # in the configured order
    train, _ = split_retention(used, ["Sure."] * len(used), seed=0)
    assert [p for p, _ in train] == [p for p in prompts if p not in {q for q, _ in holdout}][:3]
    assert _retention_prompts_used(prompts, 3, True, seed=0) == prompts  # the KL term reads every one
    capped = _retention_prompts_used(prompts, 3, False, seed=0, max_holdout=4)  # a scoped run's report
    assert [p for p in capped if p in {q for q, _ in holdout}] == [p for p, _ in holdout][:4] and len(capped) == 7


def test_retention_split_keeps_long_answers_and_is_stable():
    from agent.consolidation import retained, split_retention

    prompts = [f"Tell me about topic number {i}." for i in range(40)]
    long_answer = "Topic {} is a broad subject with a long history, many schools of thought and open questions. "
    answers = [long_answer.format(i) * 3 if i % 2 else f"Short answer {i}." for i in range(40)]
    answers[3] = "   "  # nothing to keep
    train, holdout = split_retention(prompts, answers, seed=0)
    assert len(train) + len(holdout) == 39 and 10 < len(holdout) < 29
    assert any(len(a) > 200 for _, a in holdout)  # long answers are judged too, by token overlap
    assert (train, holdout) == split_retention(prompts, answers, seed=0)
    assert {p for p, _ in holdout} != {p for p, _ in split_retention(prompts, answers, seed=1)[1]}
    old = next(a for _, a in holdout if len(a) > 200)
    assert retained(old, old.replace("many", "several"))
    assert not retained(old, "42")


@pytest.mark.parametrize("replay, cap, expected", [("ratio", 2000, "half"), ("all", 2000, "all"), ("all", 3, 3)])
def test_replay_all_trains_every_earlier_example_of_the_scope_up_to_the_cap(learning_config, replay, cap, expected):
    """``replay = "all"`` makes each round a batch consolidation of everything the scope learned so far."""
    c = learning_config.consolidation
    c.replay, c.replay_cap, c.holdout_fraction = replay, cap, 0.0
    with Agent(learning_config) as agent:
        for q in QUESTIONS[:12]:
            agent.answer(q)
        assert agent.consolidate().status == "promoted"
        for q in QUESTIONS[12:18]:
            agent.answer(q)
        dry = agent.consolidate(dry_run=True)
        replayed = [p["input"] for p in dry.train_preview if p["source"] == "replay"]
        used = {e.input for e in agent.store.list_examples(status="used")}
        assert len(used) == 12 and dry.n_new == 6 and set(replayed) <= used
        assert len(replayed) == {"half": 3, "all": 12}.get(expected, expected)


def test_retention_by_distribution_keeps_the_habit_without_sampled_retention_answers(learning_config,
                                                                                     polite_model_dir):
    """No retention examples trained on, only the KL term against the base model on the retention prompts:
    held-out general prompts keep most of "Sure."'s probability where training on sums alone loses it (likelihood
    retention < 0.5 in the test above; 0.86 here at weight 1)."""
    learning_config.model = str(polite_model_dir)
    c = learning_config.consolidation
    c.retention_threshold, c.retention_ratio, c.epochs, c.retention_kl_weight = 0.8, 0.0, 4, 3.0
    with Agent(learning_config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate()
        assert report.n_retention == 0 and report.metrics["train_retention_kl"] >= 0
        assert report.metrics["retention_likelihood"] >= 0.8, report.metrics
        assert report.status == "promoted", report.reason
