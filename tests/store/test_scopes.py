"""Scopes as a whole: their summary, renaming one, merging two that are one task, and pinning one."""

from __future__ import annotations

from pathlib import Path

import pytest

from store import Store, StoreError


def _adapter(store: Store, tmp_path: Path, version: int, scope: str, serve: bool = True) -> None:
    folder = tmp_path / "adapters" / f"v{version}"
    folder.mkdir(parents=True)
    store.register_adapter(version, str(folder), None, scope=scope)
    if serve:
        store.promote_adapter(version)


@pytest.fixture
def filled(store: Store, tmp_path: Path) -> Store:
    for q in ("What is 1 + 2?", "What is 3 + 4?"):
        store.add_example(q, "x", method="pal", tag="n-plus-n")
        store.log_interaction(input=q, route="system2", tag="n-plus-n")
    store.add_example("Add 1 and 2.", "3", method="pal", tag="add-n")
    store.add_example("What is 1 + 2?", "3", method="pal", tag="add-n")  # the same input in both scopes
    store.add_example("Hello?", "Hi", method="cot")  # untagged
    _adapter(store, tmp_path, 1, "n-plus-n")
    _adapter(store, tmp_path, 2, "add-n")
    return store


def test_scopes_summarise_examples_interactions_and_the_serving_adapter(filled: Store) -> None:
    by_name = {s["scope"]: s for s in filled.scopes()}
    assert set(by_name) == {"n-plus-n", "add-n"}
    assert by_name["n-plus-n"]["examples"] == {"pending": 2} and by_name["n-plus-n"]["interactions"] == 2
    assert by_name["n-plus-n"]["serving_version"] == 1 and by_name["add-n"]["adapters"] == 1
    assert filled.example_tags() == [None, "add-n", "n-plus-n"]


def test_rename_moves_everything_and_keeps_the_adapter_serving(filled: Store) -> None:
    assert filled.rename_scope("n-plus-n", "addition") == 2
    assert filled.count_examples(tag="addition") == 2 and filled.count_examples(tag="n-plus-n") == 0
    assert {i.tag for i in filled.list_interactions()} == {"addition"}
    serving = filled.serving_adapter("addition")
    assert serving is not None and serving.version == 1
    # dedup still works under the new name: the same input is not added twice
    _, created = filled.add_example("What is 1 + 2?", "x", method="pal", tag="addition")
    assert not created


def test_rename_onto_an_existing_scope_needs_merge_and_changes_nothing_without_it(filled: Store) -> None:
    with pytest.raises(StoreError, match="merge"):
        filled.rename_scope("add-n", "n-plus-n")
    assert filled.count_examples(tag="add-n") == 2
    with pytest.raises(StoreError, match="no scope"):
        filled.rename_scope("nope", "other")


def test_merge_joins_examples_once_and_retires_the_merged_adapter(filled: Store) -> None:
    moved = filled.rename_scope("add-n", "n-plus-n", merge=True)
    assert moved == 1  # "What is 1 + 2?" was already in n-plus-n: it stays once
    assert sorted(e.input for e in filled.list_examples(tag="n-plus-n")) == [
        "Add 1 and 2.", "What is 1 + 2?", "What is 3 + 4?"]
    assert filled.count_examples(tag="add-n") == 0
    assert filled.serving_adapter("n-plus-n").version == 1  # type: ignore[union-attr]
    merged = filled.get_adapter(2)
    assert merged is not None and (merged.scope, merged.serving, merged.status) == ("n-plus-n", False, "retired")
    assert filled.rollback(2, scope="n-plus-n").version == 2  # type: ignore[union-attr]


def test_a_pin_is_listed_follows_renames_and_merges_and_comes_off(filled: Store) -> None:
    filled.pin_scope("add-n", reason="audited")
    assert filled.pinned_scopes() == {"add-n"}
    assert {s["scope"]: s["pinned"] for s in filled.scopes()} == {"add-n": True, "n-plus-n": False}
    filled.rename_scope("add-n", "addition")
    assert filled.pinned_scopes() == {"addition"}
    filled.rename_scope("n-plus-n", "addition", merge=True)  # merged into a pinned scope: still pinned
    assert filled.pinned_scopes() == {"addition"}
    assert filled.unpin_scope("addition") and not filled.unpin_scope("addition")
    assert filled.pinned_scopes() == set()
    with pytest.raises(StoreError, match="there is no scope 'nope'"):
        filled.pin_scope("nope")
