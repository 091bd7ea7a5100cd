"""Direct: the model answers the question as asked, ``k`` samples, and the samples vote.

On the local model this is plain self-consistency of the base model. Its reason to exist is a teacher
(``teacher:direct``): a strong model answers most questions well without a reasoning prompt, and a
direct answer costs a fraction of a chain of thought's tokens. One call, ``n = k``.
"""

from __future__ import annotations

from typing import Sequence

from policies.answers import extract_final, normalise
from policies.lm import LM, Generation, run_batch
from policies.system2 import prompts as P
from policies.system2.base import PromptedMethod, Sample


class Direct(PromptedMethod):
    name = "direct"
    default_prompts = P.DIRECT

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        [generations] = run_batch(lm, [self._call(self.prompts["user"].format(query=query), k)])
        return self._read(generations), 1

    def _read(self, generations: Sequence[Generation]) -> list[Sample]:
        """A stated final answer ("Answer: X") when there is one, else the whole reply as the answer:
        a direct reply is the answer (too long a reply normalises to None: a rambling, not a vote)."""
        return [Sample(trace=g.text, answer=extract_final(g.text, self.answer_kind)
                       or normalise(g.text.strip(), self.answer_kind), tokens=g.num_tokens)
                for g in generations]
