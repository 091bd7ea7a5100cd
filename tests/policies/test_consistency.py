"""Consistency filters: majority vote, position consistency, universal self-consistency."""

from __future__ import annotations

import pytest

from policies.consistency import (
    Decision,
    perturbation_agreement,
    self_consistency,
    universal_self_consistency,
    usc_decision,
)
from tests.fakes import ScriptedLM


def test_majority_accepted() -> None:
    d = self_consistency(["85", "85", "85", "86"], threshold=0.75)
    assert d == Decision(answer="85", accepted=True, votes={"85": 3, "86": 1}, agreement=0.75, filter="self_consistency")


def test_unparsable_samples_count_against() -> None:
    d = self_consistency(["85", "85", "85", None], threshold=0.8)
    assert d.answer == "85" and not d.accepted
    assert d.agreement == 0.75
    assert d.votes == {"85": 3, "<none>": 1}


def test_below_threshold_keeps_majority_answer_but_rejects() -> None:
    d = self_consistency(["a", "a", "b", "c"], threshold=0.75)
    assert d.answer == "a" and not d.accepted and d.agreement == 0.5


def test_tie_for_first_is_not_accepted() -> None:
    d = self_consistency(["a", "a", "b", "b"], threshold=0.5)
    assert d.answer is None and not d.accepted and d.agreement == 0.5


def test_empty_and_all_unparsable() -> None:
    assert self_consistency([]) == Decision(None, False, {}, 0.0, "self_consistency")
    d = self_consistency([None, None])
    assert d.answer is None and not d.accepted and d.votes == {"<none>": 2}


def test_perturbation_maps_swapped_verdicts_back() -> None:
    # Original order says A; swapped order says B, which is A mapped back: consistent.
    pairs = [("A", "B"), ("A", "B"), ("A", "B"), ("tie", "tie")]
    d = perturbation_agreement(pairs, threshold=0.75)
    assert d.filter == "perturbation"
    assert d.answer == "A" and d.accepted and d.agreement == 0.75
    assert d.votes == {"A": 3, "tie": 1}


def test_perturbation_position_bias_is_rejected() -> None:
    # A judge that always prefers the first response says "A" in both orders: inconsistent.
    d = perturbation_agreement([("A", "A")] * 4)
    assert not d.accepted and d.answer is None and d.votes == {"<none>": 4}


def test_perturbation_unparsable_and_mixed() -> None:
    d = perturbation_agreement([("B", "A"), ("B", None), (None, "A"), ("B", "A")], threshold=0.5)
    assert d.answer == "B" and d.accepted and d.agreement == 0.5 and d.votes == {"B": 2, "<none>": 2}


def test_usc_makes_one_greedy_call_listing_candidates() -> None:
    lm = ScriptedLM("2")
    index, tokens = universal_self_consistency("Who wrote Hamlet?", ["Marlowe", "Shakespeare", "Shakespeare."], lm)
    assert (index, tokens) == (1, 3)
    [call] = lm.calls
    assert call.n == 1 and call.temperature == 0.0 and call.max_new_tokens == 16
    prompt = call.messages[-1][1]
    assert "Who wrote Hamlet?" in prompt and "Response 1: Marlowe" in prompt and "Response 3: Shakespeare." in prompt
    assert "most consistent with the majority" in prompt and "number only" in prompt


@pytest.mark.parametrize("reply, expected", [("Response 3", 2), ("The most consistent is 1.", 0), ("7", None), ("none", None), ("0", None)])
def test_usc_parses_reply(reply: str, expected: int | None) -> None:
    index, _ = universal_self_consistency("q", ["a", "b", "c"], ScriptedLM(reply))
    assert index == expected


def test_usc_needs_no_call_for_fewer_than_two_candidates() -> None:
    lm = ScriptedLM("1")
    assert universal_self_consistency("q", [], lm) == (None, 0)
    assert universal_self_consistency("q", ["only"], lm) == (0, 0)
    assert lm.calls == []


def test_usc_decision() -> None:
    answers = [
        "the capital of france is paris",
        None,
        "paris is the capital of france",
        "it is lyon",
    ]
    decision, tokens = usc_decision("capital of France?", answers, ScriptedLM("1"))
    assert tokens == 3
    assert decision.accepted and decision.answer == "the capital of france is paris"
    assert decision.filter == "universal_self_consistency"
    assert decision.agreement == 0.5  # two of four samples are near-identical to the chosen one
    assert decision.votes["<none>"] == 1


def test_usc_decision_without_choice() -> None:
    decision, _ = usc_decision("q", ["a", "b"], ScriptedLM("no idea"))
    assert not decision.accepted and decision.answer is None
    decision, tokens = usc_decision("q", [None, None], ScriptedLM("1"))
    assert not decision.accepted and tokens == 0
