"""Per-source caps: no capped source holds more than its share of what one consolidation trains on."""

from __future__ import annotations

from collections import Counter

import pytest

from policies.sources import cap_by_source, cap_limit


def items(**counts: int) -> list[tuple[str, int]]:
    """``(source, i)`` pairs, ``counts[source]`` of each, in one interleaved, deterministic order."""
    out = [(source, i) for source, n in counts.items() for i in range(n)]
    return sorted(out, key=lambda item: (item[1], item[0]))


def share_ok(selected: list[tuple[str, int]], max_share: float, uncapped: set[str]) -> bool:
    total = len(selected)
    return all(n <= max_share * total + 1e-9 for s, n in Counter(s for s, _ in selected).items() if s not in uncapped)


def test_a_flooding_source_is_cut_to_its_share_and_the_rest_waits():
    pool = items(mallory=40, alice=6, bob=4)
    cap = cap_by_source(pool, lambda item: item[0], 0.5)
    chosen = Counter(source for source, _ in cap.selected)
    assert chosen == {"mallory": 10, "alice": 6, "bob": 4}
    assert share_ok(cap.selected, 0.5, set())
    assert cap.deferred_by_source == {"mallory": 30} and len(cap.deferred) == 30
    assert [i for s, i in cap.selected if s == "mallory"] == list(range(10))  # its oldest first


def test_uncapped_sources_count_in_the_total_but_are_never_cut():
    pool = items(local=20, mallory=50)
    cap = cap_by_source(pool, lambda item: item[0], 0.5, uncapped={"local"})
    assert Counter(s for s, _ in cap.selected) == {"local": 20, "mallory": 20}
    assert share_ok(cap.selected, 0.5, {"local"})


def test_a_capped_source_alone_trains_on_nothing():
    cap = cap_by_source(items(mallory=30), lambda item: item[0], 0.5)
    assert cap.selected == [] and len(cap.deferred) == 30 and cap.limit == 0


def test_share_one_or_only_uncapped_sources_keep_everything():
    pool = items(mallory=30, alice=1)
    assert cap_by_source(pool, lambda item: item[0], 1.0).selected == pool
    only_local = items(local=12)
    cap = cap_by_source(only_local, lambda item: item[0], 0.2, uncapped={"local"})
    assert cap.selected == only_local and cap.limit is None


def test_balanced_sources_are_untouched():
    pool = items(alice=5, bob=5, carol=5)
    cap = cap_by_source(pool, lambda item: item[0], 0.5)
    assert cap.selected == pool and cap.deferred == []


def test_unknown_sources_are_a_source_like_any_other():
    pool = [(None, i) for i in range(4)] + [("mallory", i) for i in range(9)]
    cap = cap_by_source(pool, lambda item: item[0], 0.5, uncapped={None})
    assert Counter(s for s, _ in cap.selected) == {None: 4, "mallory": 4}


@pytest.mark.parametrize("max_share", [0.1, 0.25, 1 / 3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("counts", [(40, 6, 4), (3, 3, 3, 3), (100, 1), (7,), (9, 9, 1), (0,)])
@pytest.mark.parametrize("free", [0, 1, 5])
def test_the_selection_is_the_largest_that_keeps_every_share(counts, free, max_share):
    limit = cap_limit(list(counts), free, max_share)
    size = free + sum(min(c, limit) for c in counts)
    assert all(min(c, limit) <= max_share * size + 1e-9 for c in counts)
    # One more item from any source that has one left breaks some source's share.
    for i, c in enumerate(counts):
        if c > limit:
            bigger = [min(x, limit + (j == i)) for j, x in enumerate(counts)]
            total = free + sum(bigger)
            assert any(b > max_share * total + 1e-9 for b in bigger)


def test_the_share_must_be_a_fraction():
    with pytest.raises(ValueError):
        cap_limit([1], 0, 0.0)
