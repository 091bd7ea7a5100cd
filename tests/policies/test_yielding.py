"""TrainerTurns: a training process pauses while users are served, never longer than its longest pause."""

from __future__ import annotations

import pytest

from policies.yielding import TrainerTurns


def test_the_trainer_pauses_while_users_are_served_and_computes_when_they_leave() -> None:
    turns = TrainerTurns(max_pause=2.0, run_for=0.5)
    assert turns.computes(users=False, now=0.0)
    assert not turns.computes(users=True, now=1.0) and turns.paused
    assert not turns.computes(users=True, now=2.9)
    assert turns.computes(users=False, now=2.95) and not turns.paused
    assert not turns.computes(users=True, now=3.0)  # a new stretch: the pause before does not count
    assert not turns.computes(users=True, now=4.9)


def test_after_its_longest_pause_the_trainer_computes_beside_users_for_its_turn() -> None:
    turns = TrainerTurns(max_pause=2.0, run_for=0.5)
    assert not turns.computes(users=True, now=10.0)
    assert turns.computes(users=True, now=12.0)  # waited 2 s: its turn
    assert turns.computes(users=True, now=12.4)
    assert not turns.computes(users=True, now=12.5)  # turn over: paused again, for at most 2 s more
    assert not turns.computes(users=True, now=14.4)
    assert turns.computes(users=True, now=14.5)


@pytest.mark.parametrize("max_pause, run_for", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5)])
def test_turns_refuse_a_pause_that_is_not_positive(max_pause: float, run_for: float) -> None:
    with pytest.raises(ValueError, match="max_pause"):
        TrainerTurns(max_pause, run_for)
