"""Sources: every example and interaction says who sent it; a source's examples can be taken back."""

from __future__ import annotations

import io
import json

import pytest

from store import Store, StoreError


def test_source_is_recorded_filtered_and_exported(store: Store) -> None:
    interaction = store.log_interaction(input="What is 2+2?", route="system2", source="alice")
    store.add_example("What is 2+2?", "4", method="pal", source="alice", interaction_id=interaction)
    store.add_example("What is 3+3?", "6", method="pal", source="bob")
    store.add_example("What is 4+4?", "8", method="pal")
    assert store.get_interaction(interaction).source == "alice"
    assert [e.target for e in store.list_examples(source="alice")] == ["4"]
    assert store.example_sources() == {"alice": {"pending": 1}, "bob": {"pending": 1}, None: {"pending": 1}}
    out = io.StringIO()
    store.export_examples(out)
    assert [json.loads(line)["source"] for line in out.getvalue().splitlines()] == ["alice", "bob", None]
    with pytest.raises(StoreError, match="at most 64"):
        store.add_example("What is 5+5?", "10", method="pal", source="x" * 65)


def test_a_replaced_rejection_takes_its_new_source(store: Store) -> None:
    store.add_example("What is 2+2?", "5", method="pal", status="rejected", source="mallory")
    row, created = store.add_example("What is 2+2?", "4", method="pal", source="alice")
    assert created and row.source == "alice"


def test_import_keeps_the_exported_source_and_defaults_the_rest(store: Store) -> None:
    lines = [json.dumps({"input": "What is 2+2?", "target": "4", "source": "mallory"}),
             json.dumps({"input": "What is 3+3?", "target": "6"})]
    assert store.import_examples(io.StringIO("\n".join(lines)), source="local") == 2
    assert [(e.input, e.source) for e in store.list_examples()] == [("What is 2+2?", "mallory"),
                                                                    ("What is 3+3?", "local")]


def _adapter(store: Store, version: int, scope: str | None = None, parent: int | None = None,
             replay_ratio: float = 0.5, resume: bool = False) -> None:
    run = store.start_run(scope=scope, config={"replay_ratio": replay_ratio, "resume": resume})
    store.commit_adapter(version, f"/adapters/v{version}", parent, promote=True, scope=scope, run_id=run)


def test_purge_deletes_every_example_of_the_source_and_flags_what_learned_from_them(store: Store) -> None:
    for i in range(3):
        store.add_example(f"mallory {i}", "5", method="pal", tag="math", source="mallory")
        store.add_example(f"alice {i}", "4", method="pal", tag="math", source="alice")
    store.add_example("mallory pending", "5", method="pal", tag="math", source="mallory")
    store.add_example("mallory rejected", "5", method="pal", tag="math", source="mallory", status="rejected")
    mallory = [e.id for e in store.list_examples(source="mallory")][:3]
    alice = [e.id for e in store.list_examples(source="alice")]
    _adapter(store, 1, scope="other")  # before the poison: clean
    _adapter(store, 2, scope="math")
    store.set_example_status(mallory, "used", adapter_version=2)
    store.set_example_status(alice, "used", adapter_version=2)
    _adapter(store, 3, scope="math", parent=2)  # may have replayed v2's examples
    _adapter(store, 4, scope="other", parent=1)  # another scope: never replays math
    _adapter(store, 5, scope=None)  # the general adapter replays every scope
    _adapter(store, 6, scope="math", replay_ratio=0, parent=1)  # no replay, fresh weights
    _adapter(store, 7, scope="other", replay_ratio=0, parent=5, resume=True)  # started from v5's weights

    plan = store.purge_source("mallory", dry_run=True)
    assert store.count_examples() == 8 and not any(a.needs_retrain for a in store.list_adapters())
    report = store.purge_source("mallory")
    assert (report.examples, report.by_status) == (5, {"used": 3, "pending": 1, "rejected": 1})
    assert report.adapters == plan.adapters == [2, 3, 5, 7]
    assert report.serving == [5, 7]  # math is served by v6 now, which neither trained on them nor replayed
    assert store.list_examples(source="mallory") == [] and store.count_examples() == 3
    assert {a.version: a.needs_retrain for a in store.list_adapters()} == {
        1: False, 2: True, 3: True, 4: False, 5: True, 6: False, 7: True}
    again = store.purge_source("mallory")
    assert (again.examples, again.adapters) == (0, [])
    with pytest.raises(StoreError, match="name the source"):
        store.purge_source(" ")
