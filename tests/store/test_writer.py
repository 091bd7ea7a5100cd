"""The write-behind interaction log: rows from many threads committed in batches, nothing lost on close."""

from __future__ import annotations

import threading

import pytest

from store import Store, StoreError
from store.writer import InteractionWriter


def row(i: int) -> dict:
    return {"input": f"question {i}", "route": "system1", "final_answer": str(i), "latency_ms": 1.0}


def test_rows_from_many_threads_are_committed_in_batches(store: Store) -> None:
    writer = InteractionWriter(store)
    threads = [threading.Thread(target=lambda t=t: [writer.submit(row(t * 1000 + i)) for i in range(250)])
               for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush(timeout=30)
    assert store.stats()["interactions"]["total"] == 1000 == writer.stats.written
    assert writer.stats.batches < 1000 and writer.stats.direct == 0  # many rows per transaction
    answers = {i.final_answer for i in store.list_interactions(limit=None)}
    assert answers == {str(t * 1000 + i) for t in range(4) for i in range(250)}
    writer.close()


def test_close_commits_everything_still_queued(store: Store) -> None:
    writer = InteractionWriter(store, flush_interval_s=0.5)
    for i in range(3000):
        writer.submit(row(i))
    writer.close()
    assert store.stats()["interactions"]["total"] == 3000 and writer.stats.lost == 0
    writer.submit(row(3000))  # after close: written by the caller, synchronously
    assert writer.stats.direct == 1 and store.stats()["interactions"]["total"] == 3001


def test_a_row_the_store_would_refuse_fails_at_submit_and_queues_nothing(store: Store) -> None:
    writer = InteractionWriter(store)
    with pytest.raises(StoreError, match="route must be one of"):
        writer.submit({"input": "x", "route": "system3"})
    with pytest.raises(StoreError, match="unknown field"):
        writer.submit({"input": "x", "route": "system1", "secret": 1})
    assert writer.queued == 0
    writer.close()
    assert store.stats()["interactions"]["total"] == 0


def test_rows_with_different_fields_keep_their_defaults(store: Store) -> None:
    assert store.log_interactions([row(1), {"input": "q", "route": "system2", "method": "pal", "tokens_system2": 9},
                                   {**row(2), "error": "timeout"}]) == 3
    by_input = {i.input: i for i in store.list_interactions(limit=None)}
    assert by_input["q"].method == "pal" and by_input["q"].tokens_system2 == 9 and by_input["q"].final_answer == ""
    assert by_input["question 1"].error is None and by_input["question 2"].error == "timeout"
    assert all(i.created_at is not None and i.tokens_system1 == 0 for i in by_input.values())
