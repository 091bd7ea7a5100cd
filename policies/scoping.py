"""Which scoped adapter should serve an input that came without a task tag?

A cheap nearest-neighbour classifier: every input becomes a hashed bag of character n-grams of its
lower-cased text with digits folded to ``0`` (so "47 + 38" and "12 + 99" look alike, and a question
template outweighs the words or numbers in it), L2-normalised. An input is assigned to the tag of its
most similar known input when that similarity reaches ``min_similarity`` and the most similar
untagged ("general") input is less similar; otherwise it stays on the general adapter. No model
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
        tag = self.tags[self._labels[best]] if similarity >= self.min_similarity and similarity > general else None
        return ScopeDecision(tag, similarity, general)
