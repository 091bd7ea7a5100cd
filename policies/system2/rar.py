"""Rephrase-and-Respond (Deng et al. 2023): the model rephrases and expands the question, then answers.

- ``variant="1step"``: one call (``n=k``) rephrases and answers in the same response.
- ``variant="2step"``: one call (``n=k``) rephrases; then ``k`` calls (``n=1`` each, sent as one
  batch) answer given the original and one rephrased question. ``1 + k`` calls in all.
"""

from __future__ import annotations

from typing import Literal, Mapping

from policies.answers import AnswerKind, extract_final
from policies.lm import LM, run_batch
from policies.system2 import prompts as P
from policies.system2.base import PromptedMethod, Sample


class RephraseAndRespond(PromptedMethod):
    name = "rar"
    default_prompts = P.RAR

    def __init__(
        self,
        variant: Literal["1step", "2step"] = "1step",
        answer_kind: AnswerKind = "text",
        prompts: Mapping[str, str] | None = None,
        temperature: float = 0.7,
        top_k: int = 40,
        max_new_tokens: int = 256,
    ):
        if variant not in ("1step", "2step"):
            raise ValueError(f"variant must be '1step' or '2step', not {variant!r}")
        self.variant = variant
        super().__init__(answer_kind, prompts, temperature, top_k, max_new_tokens)

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        if self.variant == "1step":
            [generations] = run_batch(lm, [self._call(self.prompts["one_step"].format(query=query), k)])
            return self._read(generations), 1

        [rephrasings] = run_batch(lm, [self._call(self.prompts["rephrase"].format(query=query), k)])
        respond = [
            self._call(self.prompts["respond"].format(query=query, rephrased=r.text.strip() or query), 1)
            for r in rephrasings
        ]
        answers = [gens[0] for gens in run_batch(lm, respond)]
        samples = [
            Sample(
                trace=f"Rephrased: {r.text.strip()}\n\n{a.text}",
                answer=extract_final(a.text, self.answer_kind),
                tokens=r.num_tokens + a.num_tokens,
                extra={"rephrased": r.text.strip()},
            )
            for r, a in zip(rephrasings, answers)
        ]
        return samples, 1 + len(respond)
