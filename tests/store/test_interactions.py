"""The interaction log, retention sampling across time, and stats."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from store import Store, StoreError


def _log(store: Store, text: str, when: datetime, confidence: float = 0.95, route: str = "system1") -> int:
    return store.log_interaction(input=text, route=route, confidence=confidence, final_answer="a", created_at=when)


def test_log_and_list(store: Store) -> None:
    first = store.log_interaction(
        input="What is 2+2?", tag="math", route="system2", system1_answer="5", confidence=0.2, final_answer="4",
        method="cot", adapter_version=None, tokens_system1=10, tokens_system2=300, system2_calls=5,
        latency_ms=512.5, route_reason={"estimator": "mean_logprob", "score": 0.2, "threshold": 0.5},
        votes={"4": 4, "5": 1}, accepted=True,
    )  # fmt: skip
    second = store.log_interaction(input="hi", route="system1", confidence=0.99, final_answer="hello")
    rows = store.list_interactions()
    assert [r.id for r in rows] == [second, first]  # newest first
    assert rows[1].route_reason == {"estimator": "mean_logprob", "score": 0.2, "threshold": 0.5}
    assert rows[1].votes == {"4": 4, "5": 1} and rows[1].accepted is True and rows[1].error is None
    assert [r.id for r in store.list_interactions(route="system2")] == [first]
    assert store.list_interactions(since=datetime.now(timezone.utc) + timedelta(seconds=5)) == []
    with pytest.raises(StoreError, match="route must be one of"):
        store.log_interaction(input="x", route="system3")
    with pytest.raises(StoreError, match="unknown field"):
        store.log_interaction(input="x", route="system1", colour="red")


def test_confident_sample_spans_history_and_dedups(store: Store) -> None:
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    for i in range(10):  # a little old history...
        _log(store, f"old question {i}", start + timedelta(days=i))
    for i in range(300):  # ...and a lot of recent traffic
        _log(store, f"new question {i}", start + timedelta(days=100, seconds=i))
    _log(store, "OLD  question 3", start + timedelta(days=50))  # duplicate of an old one, asked again later
    _log(store, "unsure", start + timedelta(days=60), confidence=0.1)
    _log(store, "routed", start + timedelta(days=60), route="system2")
    sample = store.sample_confident_interactions(min_confidence=0.9, limit=40, seed=0)
    assert len(sample) == 40
    texts = [" ".join(r.input.lower().split()) for r in sample]
    assert len(set(texts)) == 40
    assert sum(t.startswith("old") for t in texts) >= 8  # uniform sampling would pick ~1
    assert "unsure" not in texts and "routed" not in texts
    assert [r.id for r in sample] == [r.id for r in store.sample_confident_interactions(0.9, 40, seed=0)]
    assert [r.created_at for r in sample] == sorted(r.created_at for r in sample)
    assert len(store.sample_confident_interactions(0.9, 1000)) == 310


def test_stats(store: Store) -> None:
    store.log_interaction(input="a", route="system1", final_answer="x", tokens_system1=5)
    store.log_interaction(input="b", route="system2", final_answer="y", tokens_system1=5, tokens_system2=100,
                          system2_calls=4, accepted=True, teacher_prompt_tokens=40, method="teacher:cot",
                          teacher_completion_tokens=100)  # fmt: skip
    store.log_interaction(input="c", route="system2", final_answer="z", tokens_system1=5, tokens_system2=50,
                          system2_calls=4, accepted=False, error="System 2 timed out; fell back",
                          method="cot")  # fmt: skip
    store.add_example("b", "y", method="cot")
    store.add_example("d", "w", method="rar", status="used", kind="retention")
    stats = store.stats()
    assert stats["interactions"] == {
        "total": 3, "by_route": {"system1": 1, "system2": 2}, "system2_rate": pytest.approx(2 / 3),
        "system2_acceptance_rate": 0.5, "tokens_system1": 15, "tokens_system2": 150, "system2_calls": 8, "errors": 1,
        "teacher_prompt_tokens": 40, "teacher_completion_tokens": 100, "teacher_accepted": 1, "system2_runs": 2,
    }  # fmt: skip
    examples = stats["examples"]
    assert examples["total"] == 2 and examples["by_status"] == {"pending": 1, "used": 1}
    assert examples["by_method"] == {"cot": 1, "rar": 1} and examples["by_kind"] == {"system2": 1, "retention": 1}
    per_day = examples["added_per_day"]
    assert len(per_day) == 14 and per_day[datetime.now(timezone.utc).date().isoformat()] == 2
    assert sum(per_day.values()) == 2


def test_a_background_label_is_added_to_the_answer_it_labelled(store: Store) -> None:
    first = store.log_interaction(input="a", route="system1", final_answer="x", tokens_system1=5,
                                  route_reason={"system2": "queued", "asked": "teacher:pal"})
    assert store.add_background_label(first, method="teacher:pal", tokens_system2=30, system2_calls=2, accepted=True,
                                      votes={"7": 2}, teacher_prompt_tokens=80, teacher_completion_tokens=30,
                                      route_reason={"system2": "labelled"})
    row = store.get_interaction(first)
    assert (row.route, row.final_answer, row.method, row.accepted, row.votes) == ("system1", "x", "teacher:pal",
                                                                                   True, {"7": 2})
    assert (row.tokens_system2, row.system2_calls, row.teacher_prompt_tokens) == (30, 2, 80)
    assert row.route_reason == {"system2": "labelled", "asked": "teacher:pal"}
    counted = store.stats()["interactions"]
    assert (counted["system2_runs"], counted["system2_rate"], counted["teacher_accepted"]) == (1, 0.0, 1)
    assert store.system2_outcomes(10) == [("a", "teacher:pal", True)]  # the routing memory reads it at start
    assert not store.add_background_label(first + 99, method="pal", tokens_system2=1, system2_calls=1, accepted=False)


def test_stats_on_empty_store(store: Store) -> None:
    stats = store.stats()
    assert stats["interactions"]["total"] == 0 and stats["interactions"]["system2_rate"] is None
    assert stats["examples"]["total"] == 0
