"""System 2 Attention (Weston & Sukhbaatar 2023): regenerate the input, then answer the regenerated one.

Call 1 (``n=k``) rewrites the query keeping only its relevant, unbiased parts (dropping opinions such
as "I think the answer is X"); then ``k`` calls (``n=1`` each, one batch) answer each rewrite.
Free-form answers (``answer_kind="text"``) are decided by universal self-consistency (the model picks
the most consistent sample, one more call); other kinds by majority vote.
"""

from __future__ import annotations

from policies.answers import extract_final
from policies.consistency import Decision, usc_decision
from policies.lm import LM, run_batch
from policies.system2 import prompts as P
from policies.system2.base import PromptedMethod, Sample, System2Result


class System2Attention(PromptedMethod):
    name = "s2a"
    default_prompts = P.S2A

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        [rewrites] = run_batch(lm, [self._call(self.prompts["rewrite"].format(query=query), k)])
        # An empty rewrite would leave nothing to answer: fall back to the original query.
        contexts = [r.text.strip() or query for r in rewrites]
        respond = [self._call(self.prompts["respond"].format(context=c), 1) for c in contexts]
        answers = [gens[0] for gens in run_batch(lm, respond)]
        samples = [
            Sample(
                trace=f"Context: {c}\n\n{a.text}",
                answer=extract_final(a.text, self.answer_kind),
                tokens=r.num_tokens + a.num_tokens,
                extra={"context": c},
            )
            for r, c, a in zip(rewrites, contexts, answers)
        ]
        return samples, 1 + len(respond)

    def _decide(self, query: str, samples: list[Sample], lm: LM, threshold: float) -> tuple[Decision, int, int]:
        """The decision plus the (calls, tokens) it cost: USC is one more model call."""
        if self.answer_kind != "text":
            return super().decide(query, samples, lm, threshold), 0, 0
        decision, tokens = usc_decision(query, [s.answer for s in samples], lm)
        return decision, 1, tokens

    def decide(self, query: str, samples: list[Sample], lm: LM, threshold: float) -> Decision:
        return self._decide(query, samples, lm, threshold)[0]

    def solve(self, query: str, lm: LM, k: int = 8, threshold: float = 0.75) -> System2Result:
        samples, calls = self.sample(query, lm, k)
        decision, decide_calls, decide_tokens = self._decide(query, samples, lm, threshold)
        return System2Result(
            method=self.name,
            samples=samples,
            decision=decision,
            calls=calls + decide_calls,
            tokens=sum(s.tokens for s in samples) + decide_tokens,
            extra={"decide_tokens": decide_tokens},
        )
