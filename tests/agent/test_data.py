"""The shipped prompt sets."""

from __future__ import annotations

from agent.data import general_prompts, number_prompts, retention_prompts


def test_retention_prompts_mix_number_questions_into_every_prefix() -> None:
    general, numbers, mixed = general_prompts(), number_prompts(), retention_prompts()
    assert len(general) == 128 and len(numbers) == 40
    assert sorted(mixed) == sorted(general + numbers)  # each shipped prompt once
    assert len({p.strip().lower() for p in mixed}) == len(mixed)
    first = mixed[:64]  # what a run reading 64 prompts gets: a quarter of them numbers, in order
    assert sum(p in set(numbers) for p in first) == 16
    assert [p for p in mixed if p in set(numbers)] == numbers
