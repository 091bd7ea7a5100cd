"""Per-source caps: no single source of traffic outweighs the rest of one consolidation's training data.

A runtime that learns from its traffic can be taught wrong things by it; one client (one API key) that
floods the buffer would otherwise be most of what the next adapter learns. :func:`cap_by_source` picks,
from the examples waiting to be trained on, the largest set in which no capped source holds more than
``max_share`` of it; the rest of an over-represented source is *deferred*: it stays pending and may join a
later round, once other sources have contributed enough to balance it.

Uncapped sources (the operator's own: in-process calls, a server without keys, keys with the admin right)
count in the total but are never cut. A capped source alone therefore trains on nothing: with one source
there is nothing to balance it against, so its examples wait.

Pure logic: no store, no I/O; the caller says what each item's source is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class SourceCap(Generic[T]):
    """The outcome of :func:`cap_by_source`: what trains now and what waits, in the input's order."""

    selected: list[T]
    deferred: list[T]
    limit: int | None
    """The most items any capped source may contribute to ``selected`` (None: nothing was capped)."""
    deferred_by_source: dict[Hashable, int] = field(default_factory=dict)
    """How many items of each source were deferred."""


def cap_limit(counts: Sequence[int], uncapped: int, max_share: float) -> int:
    """The per-source limit ``m`` of the largest selection in which every capped source holds at most
    ``max_share`` of it.

    With ``m = floor(max_share * T)`` for a total ``T``, the selection is ``uncapped + sum(min(c, m))``; the
    largest ``T`` for which that selection reaches ``T`` is the answer (checked from the top down: at most
    one pass over the possible totals, which are few per consolidation)."""
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], not {max_share}")
    total = uncapped + sum(counts)
    for size in range(total, -1, -1):
        limit = math.floor(max_share * size + 1e-9)
        if uncapped + sum(min(c, limit) for c in counts) >= size:
            return limit
    return 0  # pragma: no cover - size 0 always fits


def cap_by_source(
    items: Sequence[T],
    source_of: Callable[[T], Hashable],
    max_share: float,
    uncapped: Collection[Hashable] = (),
) -> SourceCap[T]:
    """Keep at most ``max_share`` of the selection from each source not in ``uncapped``.

    Items are taken in the given order (pass them oldest first: a source's oldest examples train first),
    so the outcome is deterministic. ``max_share == 1`` keeps everything."""
    counts = Counter(source_of(item) for item in items)
    capped = {source: n for source, n in counts.items() if source not in uncapped}
    if max_share >= 1 or not capped:
        return SourceCap(list(items), [], None)
    free = sum(n for source, n in counts.items() if source in uncapped)
    limit = cap_limit(list(capped.values()), free, max_share)
    taken: Counter[Hashable] = Counter()
    selected: list[T] = []
    deferred: list[T] = []
    for item in items:
        source = source_of(item)
        if source in capped and taken[source] >= limit:
            deferred.append(item)
            continue
        taken[source] += 1
        selected.append(item)
    by_source = {source: n - taken[source] for source, n in capped.items() if n > taken[source]}
    return SourceCap(selected, deferred, limit, by_source)
