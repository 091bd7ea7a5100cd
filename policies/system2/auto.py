"""``auto``: the System 2 that works without configuration: a program first, a prompted method otherwise.

With a small model, program-aided reasoning is the only System 2 that beats System 1 (the model copies
the question into a program and Python does the rest), but many questions have no program. So ``auto``
asks for programs first; when their executed answers agree, that is the answer. When they do not (no
program ran, the programs disagree, or they only assigned literals), it asks the fallback method, a
prompted one such as chain-of-thought, when one is configured. The result names the method whose answer
it is (``System2Result.method``), so the store and the logs say which one taught the example, and it
counts the tokens and calls of both attempts.
"""

from __future__ import annotations

from dataclasses import replace

from policies.lm import LM
from policies.system2.base import System2Method, System2Result


class Auto(System2Method):
    name = "auto"

    def __init__(self, first: System2Method, fallback: System2Method | None = None):
        self.first, self.fallback = first, fallback
        self.answer_kind = first.answer_kind

    def solve(self, query: str, lm: LM, k: int = 8, threshold: float = 0.75,
              fallback_lm: LM | None = None) -> System2Result:
        """``fallback_lm``: where the fallback's calls go (default: ``lm``, with the programs')."""
        result = self.first.solve(query, lm, k=k, threshold=threshold)
        if result.decision.accepted or self.fallback is None:
            return replace(result, extra={**result.extra, "tried": [result.method], "answered_by": "first"})
        second = self.fallback.solve(query, fallback_lm or lm, k=k, threshold=threshold)
        # Prefer the fallback's answer when it has one; otherwise keep the programs' (possibly unaccepted) one.
        chosen = second if second.decision.answer is not None or result.decision.answer is None else result
        return replace(chosen, calls=result.calls + second.calls, tokens=result.tokens + second.tokens,
                       extra={**chosen.extra, "tried": [result.method, second.method],
                              "answered_by": "fallback" if chosen is second else "first"})
