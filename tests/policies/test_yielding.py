"""TrainerTurns: a training process pauses while users are served, never longer than its turn."""

from __future__ import annotations

import pytest

from policies.yielding import TrainerTurns


def test_the_trainer_pauses_while_users_are_served_and_computes_when_they_leave() -> None:
    turns = TrainerTurns(turn=2.0)
    assert turns.computes(users=False, now=0.0)
    assert not turns.computes(users=True, now=1.0) and turns.paused
    assert not turns.computes(users=True, now=2.9)
    assert turns.computes(users=False, now=2.95) and not turns.paused
    assert not turns.computes(users=True, now=5.0)  # after a gap of a turn: the pause before does not count
    assert not turns.computes(users=True, now=6.9)


def test_pauses_add_up_over_gaps_shorter_than_a_turn() -> None:
    """Clients that take turns leave the engine empty for moments only: those moments do not start the count
    again, or the trainer would compute in them alone."""
    turns = TrainerTurns(turn=2.0)
    now = 0.0
    for _ in range(3):  # paused 0.6 s, computing 0.01 s, three times
        assert not turns.computes(users=True, now=now)
        assert turns.computes(users=False, now=now + 0.6)
        now += 0.61
    assert not turns.computes(users=True, now=now)
    assert turns.computes(users=True, now=now + 0.2)  # 1.8 s waited before, 0.2 s now: its turn


def test_after_a_turn_paused_the_trainer_computes_a_turn_beside_users() -> None:
    turns = TrainerTurns(turn=2.0)
    assert not turns.computes(users=True, now=10.0)
    assert turns.computes(users=True, now=12.0)  # waited 2 s: its turn
    assert turns.computes(users=True, now=13.9)
    assert not turns.computes(users=True, now=14.0)  # turn over: paused again, for at most 2 s more
    assert not turns.computes(users=True, now=15.9)
    assert turns.computes(users=True, now=16.0)


@pytest.mark.parametrize("turn", [0.0, -1.0])
def test_turns_refuse_a_turn_that_is_not_positive(turn: float) -> None:
    with pytest.raises(ValueError, match="turn must be > 0"):
        TrainerTurns(turn)
