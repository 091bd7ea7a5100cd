"""Text the backends disagree on is stored the same on both: NUL characters, strings longer than their column.

SQLite keeps a NUL and a too-long VARCHAR whole; PostgreSQL refuses the row. The store replaces NUL with
U+FFFD and refuses an over-long value with a StoreError, on every backend.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from store import Store, StoreError
from store.schema import MAX_TAG_LENGTH


def test_nul_characters_are_stored_as_replacement_characters(store: Store) -> None:
    interaction = store.log_interaction(input="a\x00b", route="system2", system1_answer="\x00", final_answer="x\x00y",
                                        error="bad \x00 output", votes={"k\x00": 2})
    row = store.get_interaction(interaction)
    assert (row.input, row.system1_answer, row.final_answer, row.error) == ("a\ufffdb", "\ufffd", "x\ufffdy",
                                                                            "bad \ufffd output")
    assert row.votes == {"k\x00": 2}  # JSON escapes NUL as \u0000: kept exactly

    example, created = store.add_example("What is \x00?", "4\x00", method="cot", tag="t\x00")
    assert created
    stored = store.get_example(example.id)
    assert (stored.input, stored.target, stored.tag) == ("What is \ufffd?", "4\ufffd", "t\ufffd")
    assert [e.id for e in store.list_examples(tag="t\x00")] == [example.id]  # a query's NUL is replaced too
    again, created = store.add_example("What is \x00?", "5", method="cot", tag="t\x00")  # the same question
    assert not created and again.id == example.id and store.count_examples() == 1


def test_strings_longer_than_their_column_are_refused(store: Store) -> None:
    too_long = "t" * (MAX_TAG_LENGTH + 1)
    with pytest.raises(StoreError, match=rf"interactions\.tag holds at most {MAX_TAG_LENGTH} characters, not 129"):
        store.log_interaction(input="q", route="system1", tag=too_long)
    with pytest.raises(StoreError, match=r"examples\.tag holds at most"):
        store.add_example("q", "a", method="cot", tag=too_long)
    with pytest.raises(StoreError, match=r"examples\.method holds at most 32 characters, not 33"):
        store.add_example("q", "a", method="m" * 33)
    assert store.list_interactions() == [] and store.count_examples() == 0  # nothing half-written

    store.log_interaction(input="q", route="system1", tag="t" * MAX_TAG_LENGTH)  # the limit itself is fine
    store.register_adapter(1, "/adapters/v1", None)
    with pytest.raises(StoreError, match=r"adapters\.scope holds at most"):  # an update, not only an insert
        store.update_adapter(1, scope=too_long)
    assert store.get_adapter(1).scope is None
    assert [i.tag for i in store.list_interactions()] == ["t" * MAX_TAG_LENGTH]


def test_an_old_over_long_value_does_not_block_other_changes_to_its_row(sqlite_path) -> None:
    with Store(sqlite_path) as store:
        store.register_adapter(1, "/adapters/v1", None)
        with store.engine.begin() as conn:  # what an older s2agent could leave in a SQLite file
            conn.execute(text("UPDATE adapters SET scope = :scope WHERE version = 1"), {"scope": "s" * 200})
        assert store.update_adapter(1, metrics={"holdout": 1.0}).metrics == {"holdout": 1.0}
        with pytest.raises(StoreError, match=r"adapters\.scope holds at most"):
            store.update_adapter(1, scope="t" * 200)
        assert store.get_adapter(1).scope == "s" * 200
