"""Unsupervised consistency filters: which System 2 answers are trustworthy enough to train on.

There are no labels in the loop, so the only evidence that a System 2 answer is right is that the
model keeps arriving at it. The paper found that distilling *without* such a filter is clearly worse,
so every example that reaches the store has passed one of these:

- :func:`self_consistency`: majority vote over k sampled final answers (CoT, RaR, PAL).
- :func:`perturbation_agreement`: a pairwise judge must give the same verdict with the two responses
  swapped (BSM); position-inconsistent verdicts are votes for nothing.
- :func:`usc_decision`: universal self-consistency, for free-form answers where exact votes never
  agree: the model itself picks the candidate most consistent with the others (S2A).

All of them return a :class:`Decision`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from policies.answers import similarity
from policies.lm import LM, Call

logger = logging.getLogger(__name__)

@dataclass
class Decision:
    """What a consistency filter concluded about a query's samples."""

    answer: str | None
    """The consensus answer (the training target), or None when there is none."""
    accepted: bool
    votes: dict[str, int]
    agreement: float
    """Share of all samples (unparsable ones included) that gave ``answer``."""
    filter: str


NONE_KEY = "<none>"
"""Key under which unparsable samples are counted in :attr:`Decision.votes`."""

USC_SIMILARITY = 0.8
"""Token F1 at or above which a sample counts as agreeing with the USC-chosen candidate."""


def self_consistency(answers: Sequence[str | None], threshold: float = 0.75) -> Decision:
    """Majority vote over sampled final answers.

    ``agreement`` is the top answer's count over *all* samples, so unparsable samples (None) count
    against it: a method that rarely states an answer must not look confident. Accepted when the
    agreement reaches ``threshold`` and the top answer is unique; a tie for first place is no
    consensus, and ``answer`` is then None. When the top answer is unique but below the threshold,
    ``answer`` is still that majority answer (the caller may serve it) but it is not accepted for
    training.
    """
    if not answers:
        return Decision(answer=None, accepted=False, votes={}, agreement=0.0, filter="self_consistency")
    counts = Counter(a for a in answers if a is not None)
    votes = dict(counts.most_common())
    missing = sum(a is None for a in answers)
    if missing:
        votes[NONE_KEY] = missing
    if not counts:
        return Decision(answer=None, accepted=False, votes=votes, agreement=0.0, filter="self_consistency")
    ranked = counts.most_common(2)
    top, top_count = ranked[0]
    unique = len(ranked) == 1 or ranked[1][1] < top_count
    agreement = top_count / len(answers)
    return Decision(
        answer=top if unique else None,
        accepted=unique and agreement >= threshold,
        votes=votes,
        agreement=agreement,
        filter="self_consistency",
    )


_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def perturbation_agreement(
    pairs: Sequence[tuple[str | None, str | None]], threshold: float = 0.75
) -> Decision:
    """Position-consistency filter for pairwise judging (verdicts "A", "B", "tie").

    Each pair is (verdict with the responses in their original order, verdict with them swapped,
    *not* mapped back). The swapped verdict is mapped back (A<->B, tie stays); a pair whose two
    verdicts then agree is a vote for that verdict, any other pair is an unparsable (None) vote,
    because a judge that flips with the order is judging position, not quality.
    """
    votes: list[str | None] = []
    for original, swapped in pairs:
        mapped = _SWAP.get(swapped) if swapped is not None else None
        votes.append(original if original is not None and original == mapped else None)
    return replace(self_consistency(votes, threshold), filter="perturbation")


_USC_PROMPT = (
    "I have generated the following responses to the question: {query}\n\n"
    "{responses}\n\n"
    "Which response is most consistent with the majority of the responses? "
    "Answer with the number only."
)
_FIRST_INT = re.compile(r"\d+")


def universal_self_consistency(
    query: str, candidates: Sequence[str], lm: LM, *, max_new_tokens: int = 16
) -> tuple[int | None, int]:
    """Let the model pick the candidate most consistent with the others (Chen et al. 2023).

    One greedy call lists the candidates numbered from 1 and asks for a number. Returns the chosen
    0-based index (None when the reply names no valid candidate) and the tokens generated. With
    fewer than two candidates there is nothing to choose, so no call is made.
    """
    if not candidates:
        return None, 0
    if len(candidates) == 1:
        return 0, 0
    responses = "\n\n".join(f"Response {i}: {c}" for i, c in enumerate(candidates, start=1))
    call = Call(
        messages=(("user", _USC_PROMPT.format(query=query, responses=responses)),),
        n=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
    )
    generation = lm([call])[0][0]
    tokens = generation.num_tokens
    match = _FIRST_INT.search(generation.text or "")
    if match is None:
        logger.debug("USC reply names no response: %r", generation.text)
        return None, tokens
    index = int(match.group()) - 1
    if not 0 <= index < len(candidates):
        logger.debug("USC reply names response %d of %d", index + 1, len(candidates))
        return None, tokens
    return index, tokens


def usc_decision(query: str, samples_answers: Sequence[str | None], lm: LM) -> tuple[Decision, int]:
    """Universal self-consistency as a :class:`Decision`, for free-form answers.

    The candidates are the parsable answers. Accepted when the model chose one; ``agreement`` is
    the share of *all* samples whose answer has token F1 >= :data:`USC_SIMILARITY` with the chosen
    one, reported so that callers can see how much of a consensus the choice really was. Returns
    the decision and the tokens the choice cost.
    """
    counts = Counter(a for a in samples_answers if a is not None)
    votes = dict(counts.most_common())
    missing = sum(a is None for a in samples_answers)
    if missing:
        votes[NONE_KEY] = missing
    candidates = [a for a in samples_answers if a is not None]
    index, tokens = universal_self_consistency(query, candidates, lm)
    if index is None:
        decision = Decision(
            answer=None, accepted=False, votes=votes, agreement=0.0, filter="universal_self_consistency"
        )
        return decision, tokens
    chosen = candidates[index]
    agreeing = sum(a is not None and similarity(a, chosen) >= USC_SIMILARITY for a in samples_answers)
    decision = Decision(
        answer=chosen,
        accepted=True,
        votes=votes,
        agreement=agreeing / len(samples_answers),
        filter="universal_self_consistency",
    )
    return decision, tokens
