"""Where has System 2 paid off? A nearest-neighbour memory of System 2's outcomes.

The router sends a query to System 2 when System 1 is unsure. With a small model that is nearly every
query, and for many kinds of input System 2 cannot help either: program-aided reasoning accepts only what a
program can compute, so a general question or one nobody can answer costs a System 2 attempt (seconds of
the user's wait, ~100 tokens) and yields nothing, every time it is asked. This memory remembers, per input,
whether System 2's run produced an accepted answer, and before the next run looks at the most similar
earlier inputs (the character n-gram features of :mod:`policies.scoping`): when enough of them are close
and almost none of them paid off, System 2 is skipped and System 1's answer stands. An input asked again
(the same text) that System 2 failed on ``repeat_failures`` times and never answered is skipped at once:
a question users repeat is the one that would cost a System 2 run each time.

It stays open to change: a share ``explore`` of the inputs it would skip still go to System 2 (so a kind of
input that System 2 learns to handle, a new method or a teacher, is noticed), and outcomes are kept per
System 2 method, so configuring another method starts from no evidence. Pure logic: the caller feeds it
outcomes (from the store at start, then as they happen) and a random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from policies.scoping import BUCKETS, featurise


@dataclass(frozen=True)
class MemoryVerdict:
    """What the memory says about running System 2 on one input."""

    skip: bool
    """True: System 1's answer stands, System 2 is not run."""
    evidence: int
    """Earlier inputs of the same method at least ``min_similarity`` alike (at most ``neighbours``)."""
    paid_off: int
    """How many of those got an accepted System 2 answer."""
    explored: bool = False
    """The evidence said skip, but this input was drawn to run System 2 anyway (``explore``)."""
    repeated: bool = False
    """The evidence is this very input, asked before (``repeat_failures``)."""

    @property
    def expected_yield(self) -> float:
        """The chance that System 2 pays off for this input, by Laplace's rule of succession over the similar
        inputs: (paid off + 1) / (evidence + 2); 0.5 for a kind of input the memory has not seen."""
        return (self.paid_off + 1) / (self.evidence + 2)

    def as_dict(self) -> dict[str, object]:
        return {"skip": self.skip, "evidence": self.evidence, "paid_off": self.paid_off, "explored": self.explored,
                "repeated": self.repeated}


class _Outcomes:
    """The last ``capacity`` outcomes of one method: features, whether each paid off, and per exact text (the
    features fold digits, so "What is 12 + 30?" and "What is 47 + 38?" look the same to them) how many of its
    runs failed and paid off (a ring)."""

    def __init__(self, capacity: int) -> None:
        self.features = np.zeros((capacity, BUCKETS), dtype=np.float32)
        self.paid = np.zeros(capacity, dtype=bool)
        self.keys: list[str | None] = [None] * capacity
        self.by_text: dict[str, list[int]] = {}
        """Exact text -> [failed, paid off] among the outcomes kept."""
        self.size = 0
        self.next = 0

    def add(self, key: str, x: np.ndarray, paid_off: bool) -> None:
        old = self.keys[self.next]
        if old is not None:  # the ring forgets its oldest outcome
            counts = self.by_text[old]
            counts[bool(self.paid[self.next])] -= 1
            if not any(counts):
                del self.by_text[old]
        self.features[self.next] = x
        self.paid[self.next] = paid_off
        self.keys[self.next] = key
        self.by_text.setdefault(key, [0, 0])[paid_off] += 1
        self.next = (self.next + 1) % len(self.paid)
        self.size = min(self.size + 1, len(self.paid))


class System2Memory:
    """See the module docstring. ``judge`` before running System 2, ``add`` with each run's outcome.

    ``neighbours``: how many of the most similar earlier inputs are consulted; ``min_similarity``: cosine
    similarity for an earlier input to count; ``min_evidence``: how many must count before anything is
    skipped; ``min_yield``: System 2 is skipped when the share of them that paid off is below this;
    ``repeat_failures``: failures on the same text, with no success, that skip it at once (0: never);
    ``explore``: share of would-be skips that run System 2 anyway; ``capacity``: outcomes kept per method.
    """

    def __init__(self, *, neighbours: int = 8, min_similarity: float = 0.6, min_evidence: int = 4,
                 min_yield: float = 0.2, repeat_failures: int = 1, explore: float = 0.05, capacity: int = 2000,
                 seed: int = 0) -> None:
        if not 0.0 < min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
        if not 1 <= min_evidence <= neighbours:
            raise ValueError(f"min_evidence must be in [1, neighbours={neighbours}], got {min_evidence}")
        if not 0.0 <= explore <= 1.0 or not 0.0 <= min_yield <= 1.0:
            raise ValueError("explore and min_yield must be in [0, 1]")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if repeat_failures < 0:
            raise ValueError(f"repeat_failures must be at least 0, got {repeat_failures}")
        self.repeat_failures = repeat_failures
        self.neighbours, self.min_similarity, self.min_evidence = neighbours, min_similarity, min_evidence
        self.min_yield, self.explore, self.capacity = min_yield, explore, capacity
        self._rng = random.Random(seed)
        self._methods: dict[str, _Outcomes] = {}

    def __len__(self) -> int:
        return sum(o.size for o in self._methods.values())

    def add(self, text: str, method: str, paid_off: bool) -> None:
        """Remember that System 2 (``method``) on ``text`` did (or did not) give an accepted answer."""
        outcomes = self._methods.get(method)
        if outcomes is None:
            outcomes = self._methods[method] = _Outcomes(self.capacity)
        outcomes.add(_key(text), featurise([text])[0], paid_off)

    def judge(self, text: str, method: str) -> MemoryVerdict:
        """Whether to skip System 2 (``method``) on ``text``, and the evidence for it."""
        [verdict] = self.judge_many([text], method)
        return self._skip(verdict.evidence, verdict.paid_off, verdict.repeated) if verdict.skip else verdict

    def judge_many(self, texts: Sequence[str], method: str) -> list[MemoryVerdict]:
        """What the memory says about each of ``texts``, in one product with its outcomes, without drawing
        whether a would-be skip explores (:meth:`judge` draws that): a queue of inputs waiting for System 2
        is looked over as a whole with this."""
        outcomes = self._methods.get(method)
        if outcomes is None or not texts:
            return [MemoryVerdict(skip=False, evidence=0, paid_off=0) for _ in texts]
        similarities = featurise(texts) @ outcomes.features[:outcomes.size].T
        verdicts = []
        for text, sims in zip(texts, similarities):
            failed, paid = outcomes.by_text.get(_key(text), (0, 0))
            if self.repeat_failures and failed >= self.repeat_failures and not paid:
                verdicts.append(MemoryVerdict(skip=True, evidence=failed, paid_off=0, repeated=True))
                continue
            close = np.flatnonzero(sims >= self.min_similarity)
            if len(close) > self.neighbours:
                close = close[np.argsort(sims[close])[-self.neighbours:]]
            evidence, paid_off = len(close), int(outcomes.paid[close].sum())
            skip = evidence >= self.min_evidence and paid_off < self.min_yield * evidence
            verdicts.append(MemoryVerdict(skip=skip, evidence=evidence, paid_off=paid_off))
        return verdicts

    def _skip(self, evidence: int, paid_off: int, repeated: bool = False) -> MemoryVerdict:
        """Skip, unless this input is drawn to explore."""
        explored = self._rng.random() < self.explore
        return MemoryVerdict(skip=not explored, evidence=evidence, paid_off=paid_off, explored=explored,
                             repeated=repeated)


def _key(text: str) -> str:
    """The same question asked again: case and spacing aside, the same text."""
    return " ".join(text.lower().split())
