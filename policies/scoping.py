"""Which scoped adapter should serve an input that came without a task tag?

A cheap nearest-neighbour classifier: every input becomes a hashed bag of character n-grams of its
lower-cased text with digits folded to ``0`` (so "47 + 38" and "12 + 99" look alike, and a question
template outweighs the words or numbers in it), L2-normalised. An input is assigned to the tag of its
most similar known input when that similarity reaches ``min_similarity`` and no untagged ("general")
input is more similar; otherwise it stays on the general adapter. A tie goes to the tag: the tagged
input's evidence is an answer System 2 found and kept, the untagged one's only that System 1 was
confident, which on a task it has not learned yet is often misplaced (in the live replay, two sums System
1 answered alone at confidence 0.53 kept every "What is 67 plus 56?", the same template after folding,
off the sums adapter). No model
call, no training loop: fitting a thousand inputs takes a fraction of a second, a prediction well under
a millisecond.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

NGRAMS = (3, 4, 5)
TIE = 1e-6
"""Similarities this close are equal: the same template gives the same features, but two dot products of
them may round apart."""
BUCKETS = 1 << 12


def featurise(texts: Sequence[str], buckets: int = BUCKETS) -> np.ndarray:
    """Rows of L2-normalised hashed character n-gram counts (crc32: stable across processes)."""
    matrix = np.zeros((len(texts), buckets), dtype=np.float32)
    for row, text in enumerate(texts):
        folded = " " + re.sub(r"\s+", " ", re.sub(r"\d", "0", text.lower())).strip() + " "
        for n in NGRAMS:
            for start in range(len(folded) - n + 1):
                matrix[row, zlib.crc32(folded[start:start + n].encode()) % buckets] += 1.0
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class ScopeDecision:
    tag: str | None
    """The assigned tag, or None: the general adapter serves."""
    similarity: float
    """Cosine similarity to the nearest input of ``tag`` (of the best tag when none was assigned)."""
    general_similarity: float
    """Cosine similarity to the nearest untagged input."""


class ScopeClassifier:
    """Nearest known input decides; see the module docstring."""

    def __init__(self, scoped: Mapping[str, Sequence[str]], general: Sequence[str], min_similarity: float = 0.6):
        if not 0.0 < min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
        self.min_similarity = min_similarity
        self.tags = sorted(tag for tag, texts in scoped.items() if texts)
        texts = [t for tag in self.tags for t in scoped[tag]]
        self._labels = np.array([i for i, tag in enumerate(self.tags) for _ in scoped[tag]], dtype=np.int64)
        self._scoped = featurise(texts)
        self._general = featurise(list(general))

    def classify(self, text: str) -> ScopeDecision:
        if not self.tags:
            return ScopeDecision(None, 0.0, 0.0)
        x = featurise([text])[0]
        sims = self._scoped @ x
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        general = float((self._general @ x).max()) if len(self._general) else 0.0
        closer = similarity >= general - TIE  # a tie goes to the tag: see the module docstring
        tag = self.tags[self._labels[best]] if similarity >= self.min_similarity and closer else None
        return ScopeDecision(tag, similarity, general)


_STOPWORDS = frozenset("a an the of in on to for is are be and or what which who how do does".split())
_OPERATORS = {"+": "plus", "-": "minus", "*": "times", "×": "times", "/": "over"}


def scope_name(text: str, words: int = 4) -> str:
    """A readable, stable name for a scope, made from the first input that started it.

    Lower-cased words with numbers folded to ``n``, operators spelled out, quoted material and the most
    common question words dropped: "What is 47 + 38?" -> ``n-plus-n``, "Add 47 and 38." -> ``add-n-n``,
    "How many letters are in the word 'garden'?" -> ``many-letters-word``. An operator renames it with
    ``agent scopes rename``."""
    unquoted = re.sub(r"(['\"]).*?\1", " ", text.lower())
    tokens = re.findall(r"[a-z]+|\d+|[+\-*/×]", unquoted)
    picked: list[str] = []
    for token in tokens:
        token = "n" if token.isdigit() else _OPERATORS.get(token, token)
        if token in _STOPWORDS or (picked and picked[-1] == token):
            continue
        picked.append(token)
        if len(picked) == words:
            break
    return "-".join(picked) or "scope"


def solution_features(solution: str) -> np.ndarray:
    """The features of a System 2 solution (a PAL program) with its particulars folded away: comments dropped,
    string literals emptied, numbers folded to ``0``, spaces dropped. "answer = 47 + 38" and "answer = 5 + 9" are
    then the same, whichever phrasing of the question they solved."""
    shape = re.sub(r"#[^\n]*", "", solution)
    shape = re.sub(r"(['\"]).*?\1", '""', shape)
    shape = re.sub(r"[ \t]+", "", re.sub(r"\d+(\.\d+)?", "0", shape))  # 47 and 3.5 alike; spacing is style
    return featurise([shape])[0]


class ScopeIndex:
    """Groups untagged inputs into scopes as they arrive: each input joins the scope of its most similar
    known input when that similarity reaches ``min_similarity``; failing that, the scope of the known input
    whose System 2 solution has the same shape (:func:`solution_features` similarity at least
    ``min_solution_similarity``: "Add 47 and 38." joins "What is 12 + 30?" because both were solved by
    ``answer = 0 + 0``); else it starts a new scope, named by :func:`scope_name`. Text features are the
    :class:`ScopeClassifier`'s, so once one input of a phrasing is in a scope, the classifier sends that
    phrasing to the scope's adapter."""

    def __init__(self, scoped: Mapping[str, Sequence[str]], min_similarity: float = 0.5,
                 min_solution_similarity: float = 0.9):
        for name, value in (("min_similarity", min_similarity), ("min_solution_similarity", min_solution_similarity)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.min_similarity = min_similarity
        self.min_solution_similarity = min_solution_similarity
        self._tags: list[str] = [tag for tag, texts in scoped.items() for _ in texts]
        texts = [t for texts in scoped.values() for t in texts]
        self._features = featurise(texts) if texts else np.zeros((0, BUCKETS), dtype=np.float32)
        self._solved: list[str] = []  # tags of the rows of _solutions
        self._solutions = np.zeros((0, BUCKETS), dtype=np.float32)

    @property
    def scopes(self) -> set[str]:
        return set(self._tags)

    def assign(self, text: str, solution: str | None = None) -> tuple[str, float]:
        """The scope ``text`` belongs to (a new one when none is similar enough) and the similarity that decided
        it (of the solutions when they did); the input, and its ``solution`` when given, join the index."""
        x = featurise([text])
        tag, similarity = None, 0.0
        if self._tags:
            sims = self._features @ x[0]
            best = int(np.argmax(sims))
            if sims[best] >= self.min_similarity:
                tag, similarity = self._tags[best], float(sims[best])
        shape = solution_features(solution) if solution else None
        if tag is None and shape is not None and self._solved:
            sims = self._solutions @ shape
            best = int(np.argmax(sims))
            if sims[best] >= self.min_solution_similarity:
                tag, similarity = self._solved[best], float(sims[best])
        if tag is None:
            base = tag = scope_name(text)
            taken = self.scopes
            n = 2
            while tag in taken:
                tag, n = f"{base}-{n}", n + 1
        self._tags.append(tag)
        self._features = np.vstack([self._features, x])
        if shape is not None:
            self._solved.append(tag)
            self._solutions = np.vstack([self._solutions, shape[None]])
        return tag, similarity
