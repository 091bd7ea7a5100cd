"""Chain-of-Thought: "think step by step", then a final "Answer: <answer>" line.

One call: the CoT prompt sampled ``k`` times (``n=k``, so a backend computes the prompt once).
"""

from __future__ import annotations

from policies.lm import LM, run_batch
from policies.system2 import prompts as P
from policies.system2.base import PromptedMethod, Sample


class ChainOfThought(PromptedMethod):
    name = "cot"
    default_prompts = P.COT

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        [generations] = run_batch(lm, [self._call(self.prompts["user"].format(query=query), k)])
        return self._read(generations), 1
