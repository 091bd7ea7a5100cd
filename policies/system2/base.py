"""The small interface every System 2 method implements.

A method turns one query into ``k`` sampled final answers ("votes"), using as many model calls as it
needs, and then says which consistency filter decides whether those votes make a training example.
Methods never touch a backend directly: they receive an ``LM`` callable, so they stay pure decision
logic and can be driven by any backend (or a scripted one in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

from policies.answers import AnswerKind, extract_final
from policies.consistency import Decision, self_consistency
from policies.lm import LM, Call, Generation
from policies.system2.prompts import merged


@dataclass
class Sample:
    """One System 2 attempt: its reasoning trace and the final answer read from it (None: unparsable)."""

    trace: str
    answer: str | None
    tokens: int = 0
    extra: dict = field(default_factory=dict)
    """Method-specific details (e.g. BSM's swapped-order verdict, PAL's program and its error)."""


@dataclass
class System2Result:
    method: str
    samples: list[Sample]
    decision: Decision
    calls: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        return self.decision.answer


class System2Method:
    """Base class: subclasses set ``name`` and implement :meth:`sample`; override :meth:`decide` to
    use a filter other than majority-vote self-consistency."""

    name: ClassVar[str]
    answer_kind: AnswerKind = "text"

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        """Return ``k`` samples and the number of model calls (batched requests) it took."""
        raise NotImplementedError

    def decide(self, query: str, samples: list[Sample], lm: LM, threshold: float) -> Decision:
        return self_consistency([s.answer for s in samples], threshold)

    def solve(self, query: str, lm: LM, k: int = 8, threshold: float = 0.75) -> System2Result:
        samples, calls = self.sample(query, lm, k)
        decision = self.decide(query, samples, lm, threshold)
        return System2Result(
            method=self.name,
            samples=samples,
            decision=decision,
            calls=calls,
            tokens=sum(s.tokens for s in samples),
        )


def chat(system: str, user: str) -> tuple[tuple[str, str], ...]:
    """Chat messages for one user turn, with a system turn only when ``system`` is non-empty
    (without one, the model's chat template adds its default system prompt)."""
    return ((("system", system),) if system else ()) + (("user", user),)


class PromptedMethod(System2Method):
    """A method made only of prompted calls sharing one set of sampling settings (CoT, RaR, S2A, BSM).

    Subclasses name their templates in ``default_prompts`` (from :mod:`policies.system2.prompts`);
    ``prompts`` passed here override them by name.
    """

    default_prompts: ClassVar[Mapping[str, str]]

    def __init__(
        self,
        answer_kind: AnswerKind = "text",
        prompts: Mapping[str, str] | None = None,
        temperature: float = 0.7,
        top_k: int = 40,
        max_new_tokens: int = 256,
    ):
        self.answer_kind = answer_kind
        self.prompts = merged(self.default_prompts, prompts)
        self.temperature, self.top_k, self.max_new_tokens = temperature, top_k, max_new_tokens

    def _call(self, user: str, n: int) -> Call:
        """One user turn under the method's system prompt, sampled ``n`` times."""
        return Call(
            messages=chat(self.prompts["system"], user),
            n=n,
            temperature=self.temperature,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )

    def _read(self, generations: Sequence[Generation]) -> list[Sample]:
        """Samples whose answer is the final-answer line of each generation (None when absent)."""
        return [Sample(trace=g.text, answer=extract_final(g.text, self.answer_kind), tokens=g.num_tokens)
                for g in generations]
