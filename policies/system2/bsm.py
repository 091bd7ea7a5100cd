"""Branch-Solve-Merge (Saha et al. 2023) for LLM-as-a-judge: which of two responses is better?

The query carries a question and two responses as three sections, each header alone on its line::

    [Question]
    What is the capital of France?
    [Response A]
    Paris.
    [Response B]
    Lyon.

(:func:`format_judge_query` writes it; a JSON object with keys ``question``, ``response_a`` and
``response_b`` is accepted too.) The method runs three batched stages:

- **branch**: one call (``n=1``) lists ``num_criteria`` evaluation criteria for the question, shared
  by all samples (falls back to ``BSM_DEFAULT_CRITERIA`` when none can be read);
- **solve**: per criterion and per order (original, and A/B swapped), one call with ``n=k``;
- **merge**: per sample and per order, one call merging that sample's per-criterion judgements into
  a last line "Verdict: A|B|tie".

So ``1 + 2 * num_criteria + 2 * k`` calls in three model invocations. Each sample's answer is its
original-order verdict, and ``extra["swapped"]`` its verdict on the swapped order, as the model wrote
it (so "A" there names the original B). :meth:`decide` keeps only verdicts that survive the swap
(``perturbation_agreement``).
"""

from __future__ import annotations

import json
import re
from typing import Mapping, NamedTuple

from policies.answers import AnswerKind, extract_final
from policies.consistency import Decision, perturbation_agreement
from policies.lm import LM, run_batch
from policies.system2 import prompts as P
from policies.system2.base import PromptedMethod, Sample

SECTIONS = ("[Question]", "[Response A]", "[Response B]")
_HEADER = re.compile(r"^[ \t]*(\[Question\]|\[Response A\]|\[Response B\])[ \t]*$", re.MULTILINE)


class JudgeQuery(NamedTuple):
    question: str
    response_a: str
    response_b: str


def format_judge_query(question: str, response_a: str, response_b: str) -> str:
    """The query text BSM reads: three sections, in this order."""
    return f"[Question]\n{question.strip()}\n[Response A]\n{response_a.strip()}\n[Response B]\n{response_b.strip()}"


def parse_judge_query(query: str) -> JudgeQuery:
    """Read a judging query; raises ValueError unless it has each section once, in order, non-empty."""
    if query.lstrip().startswith("{"):
        try:
            data = json.loads(query)
            parts = JudgeQuery(str(data["question"]), str(data["response_a"]), str(data["response_b"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"a JSON judging query needs question, response_a and response_b: {e}") from None
    else:
        headers = list(_HEADER.finditer(query))
        if [h.group(1) for h in headers] != list(SECTIONS):
            raise ValueError(
                f"a judging query needs the sections {', '.join(SECTIONS)}, each once and in this order, "
                f"each header alone on its line; found {[h.group(1) for h in headers]}"
            )
        if query[: headers[0].start()].strip():
            raise ValueError("a judging query must start with its [Question] section")
        ends = [h.start() for h in headers[1:]] + [len(query)]
        parts = JudgeQuery(*(query[h.end() : end].strip() for h, end in zip(headers, ends)))
    for name, text in zip(SECTIONS, parts):
        if not text.strip():
            raise ValueError(f"the {name} section of the judging query is empty")
    return JudgeQuery(*(t.strip() for t in parts))


def parse_criteria(text: str, limit: int) -> list[str]:
    """Criteria from the branch output: one per line, bullets and numbering stripped, deduplicated."""
    criteria: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)]|[A-Za-z][.)](?=\s))\s*", "", line).strip().strip("*").strip()
        if not line or line.endswith(":") or len(line) > 100:
            continue
        if line.lower() not in (c.lower() for c in criteria):
            criteria.append(line)
        if len(criteria) == limit:
            break
    return criteria


def read_verdict(text: str) -> str | None:
    """The last "Verdict: X" (or "Answer: X", "[[A]]") of a judgement: "A", "B", "tie" or None."""
    return extract_final(text, "verdict")


class BranchSolveMerge(PromptedMethod):
    name = "bsm"
    default_prompts = P.BSM

    def __init__(
        self,
        answer_kind: AnswerKind = "verdict",
        prompts: Mapping[str, str] | None = None,
        num_criteria: int = 3,
        temperature: float = 0.7,
        top_k: int = 40,
        max_new_tokens: int = 128,
    ):
        if num_criteria < 1:
            raise ValueError("num_criteria must be at least 1")
        self.num_criteria = num_criteria
        super().__init__(answer_kind, prompts, temperature, top_k, max_new_tokens)

    def sample(self, query: str, lm: LM, k: int) -> tuple[list[Sample], int]:
        q = parse_judge_query(query)
        orders = {"original": (q.response_a, q.response_b), "swapped": (q.response_b, q.response_a)}

        # Branch: criteria shared by every sample.
        branch = self._call(self.prompts["branch"].format(question=q.question, num_criteria=self.num_criteria), 1)
        [[plan]] = run_batch(lm, [branch])
        criteria = parse_criteria(plan.text, self.num_criteria) or list(P.BSM_DEFAULT_CRITERIA[: self.num_criteria])

        # Solve: each criterion in each order, k samples per call.
        keys = [(order, c) for order in orders for c in criteria]
        solve = [
            self._call(
                self.prompts["solve"].format(
                    question=q.question, response_a=orders[o][0], response_b=orders[o][1], criterion=c
                ),
                k,
            )
            for o, c in keys
        ]
        judged = dict(zip(keys, run_batch(lm, solve)))

        # Merge: sample i's judgements, per order.
        merge_keys = [(i, order) for i in range(k) for order in orders]
        merge = [
            self._call(
                self.prompts["merge"].format(
                    question=q.question,
                    response_a=orders[o][0],
                    response_b=orders[o][1],
                    judgements="\n".join(
                        self.prompts["judgement"].format(criterion=c, judgement=judged[(o, c)][i].text.strip())
                        for c in criteria
                    ),
                ),
                1,
            )
            for i, o in merge_keys
        ]
        merged = {key: gens[0] for key, gens in zip(merge_keys, run_batch(lm, merge))}

        samples = []
        for i in range(k):
            original, swapped = merged[(i, "original")], merged[(i, "swapped")]
            solve_tokens = sum(judged[key][i].num_tokens for key in keys)
            samples.append(
                Sample(
                    trace=f"{original.text}\n\n[swapped order]\n{swapped.text}",
                    answer=read_verdict(original.text),
                    # The shared branch call's tokens are counted once, on the first sample.
                    tokens=solve_tokens + original.num_tokens + swapped.num_tokens + (plan.num_tokens if i == 0 else 0),
                    extra={"swapped": read_verdict(swapped.text), "criteria": criteria},
                )
            )
        return samples, 1 + len(solve) + len(merge)

    def decide(self, query: str, samples: list[Sample], lm: LM, threshold: float) -> Decision:
        return perturbation_agreement([(s.answer, s.extra.get("swapped")) for s in samples], threshold)
