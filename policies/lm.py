"""The language-model seam of the policies: what a call is, what comes back, and how a batch is sent.

This is the leaf every policy that talks to a model imports (System 2 methods, the USC filter). It knows
nothing about backends: the runtime adapts its backend to the :data:`LM` callable, tests pass a scripted
one, so all decision logic stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


@dataclass(frozen=True)
class Call:
    """One model call a policy asks for: chat messages, sampled ``n`` times.

    All ``n`` samples share the prompt, so a backend computes its prefix once.
    """

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs; a tuple so that calls are hashable and comparable in tests."""
    n: int = 1
    temperature: float = 0.7
    top_k: int = 40
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


class Generation(Protocol):
    """What a policy reads from one generated sample."""

    text: str

    @property
    def num_tokens(self) -> int: ...


LM = Callable[[Sequence[Call]], list[list[Generation]]]
"""Runs a batch of calls; returns, per call, ``call.n`` generations."""


def run_batch(lm: LM, calls: Sequence[Call]) -> list[list[Generation]]:
    """Send ``calls`` to ``lm`` as one batch and check it answered each with ``call.n`` generations."""
    results = lm(list(calls))
    if len(results) != len(calls) or any(len(r) != c.n for r, c in zip(results, calls)):
        got = [len(r) for r in results]
        raise ValueError(f"LM returned {got} generations for calls asking for {[c.n for c in calls]}")
    return results
