"""The facts `agent bench general` measures retention on."""

from __future__ import annotations

from agent.data import number_prompts, retention_prompts
from bench.facts import MORE_FACTS
from bench.live import FACTS


def test_more_facts_are_new_questions_no_run_trains_on() -> None:
    shipped = {p.strip().lower() for p in retention_prompts()}
    questions = [f.question.strip().lower() for f in MORE_FACTS]
    assert len(set(questions)) == len(questions) == 96
    assert not shipped & set(questions)  # never a retention training prompt
    assert not {f.question.strip().lower() for f in FACTS} & set(questions)
    assert all(f.answers and f.known_in(f"It is {f.answers[0]}.") for f in MORE_FACTS)


def test_number_prompts_are_none_of_the_measured_facts() -> None:
    """The number questions were written after seeing which facts the sums broke: none may be one of them."""
    measured = {f.question.strip().lower() for f in (*FACTS, *MORE_FACTS)}
    assert not measured & {p.strip().lower() for p in number_prompts()}
