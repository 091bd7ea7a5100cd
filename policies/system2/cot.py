"""Chain-of-Thought: "think step by step", then a final "Answer: <answer>" line.

One call: the CoT prompt sampled ``k`` times (``n=k``, so a backend computes the prompt once).
"""

from __future__ import annotations

from typing import Mapping

from policies.answers import AnswerKind, extract_final
from policies.system2 import prompts as P
from policies.system2.base import LM, Call, Sample, System2Method, run_batch


def chat(system: str, user: str) -> tuple[tuple[str, str], ...]:
    """Chat messages for one user turn, with a system turn only when ``system`` is non-empty
    (without one, the model's chat template adds its default system prompt)."""
    return ((("system", system),) if system else ()) + (("user", user),)


class ChainOfThought(System2Method):
    name = "cot"

    def __init__(
        self,
        answer_kind: AnswerKind = "text",
        prompts: Mapping[str, str] | None = None,
        temperature: float = 0.7,
        top_k: int = 40,
        max_new_tokens: int = 256,
    ):
        self.answer_kind = answer_kind
        self.prompts = P.merged(P.COT, prompts)
        self.temperature, self.top_k, self.max_new_tokens = temperature, top_k, max_new_tokens

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        call = Call(
            messages=chat(self.prompts["system"], self.prompts["user"].format(query=query)),
            n=k,
            temperature=self.temperature,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )
        [generations] = run_batch(lm, [call])
        samples = [
            Sample(trace=g.text, answer=extract_final(g.text, self.answer_kind), tokens=g.num_tokens)
            for g in generations
        ]
        return samples, 1
