"""The distillation buffer: dedup rules, statuses, sampling, pruning, import and export."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest

from store import ExampleKind, ExampleStatus, ImportValidationError, Store, StoreError
from store.schema import utcnow


def test_dedup_on_normalised_input_and_tag(store: Store) -> None:
    first, created = store.add_example("What is  2+2?", "4", method="cot", agreement=0.8, tag="math")
    assert created and first.status == "pending" and first.kind == "system2"
    again, created = store.add_example("  what IS 2+2? ", "5", method="rar", tag="math")
    assert not created and again.id == first.id and again.target == "4"  # returned unchanged
    other_tag, created = store.add_example("What is 2+2?", "4", method="cot", tag="trivia")
    assert created and other_tag.id != first.id
    assert store.count_examples() == 2


def test_pending_replaces_rejected_in_place(store: Store) -> None:
    old, _ = store.add_example("capital of France?", "Lyon", method="cot", status="rejected", agreement=0.4)
    new, created = store.add_example("Capital of France?", "Paris", method="bsm", agreement=1.0)
    assert created and new.id == old.id
    row = store.get_example(old.id)
    assert row is not None
    assert (row.target, row.status, row.method, row.agreement) == ("Paris", "pending", "bsm", 1.0)
    assert row.updated_at >= old.updated_at
    # but a rejected answer does not replace a pending one, nor a pending one a used one
    same, created = store.add_example("capital of france?", "Nice", method="cot", status="rejected")
    assert not created and same.target == "Paris"
    store.set_example_status([row.id], "used", adapter_version=3)
    same, created = store.add_example("capital of france?", "Marseille", method="cot")
    assert not created and same.target == "Paris" and same.status == "used"


def test_status_transitions_and_filters(store: Store) -> None:
    ids = [store.add_example(f"q{i}", f"a{i}", method="cot" if i % 2 else "rar", tag="t")[0].id for i in range(6)]
    store.set_example_status(ids[:2], ExampleStatus.USED, adapter_version=1)
    store.set_example_status(ids[2], "holdout")
    assert store.count_examples("pending") == 3
    assert store.count_examples(["used", "holdout"]) == 3
    assert store.count_examples(tag="t") == 6 and store.count_examples(tag="other") == 0
    used = store.list_examples(status="used")
    assert [e.id for e in used] == ids[:2] and {e.adapter_version for e in used} == {1}
    assert [e.id for e in store.list_examples(order="desc", limit=2)] == ids[:-3:-1]
    assert {e.method for e in store.list_examples(method="rar")} == {"rar"}
    assert store.list_examples(kind="import") == []
    assert len(store.list_examples(since=utcnow() - timedelta(minutes=1))) == 6
    assert store.list_examples(since=utcnow() + timedelta(minutes=1)) == []
    with pytest.raises(StoreError, match="status must be one of"):
        store.set_example_status(ids, "done")
    with pytest.raises(StoreError, match="non-empty"):
        store.add_example("  ", "x", method="cot")
    assert store.get_example(10_000) is None


def test_sample_is_random_but_reproducible(store: Store) -> None:
    for i in range(50):
        store.add_example(f"q{i}", f"a{i}", method="cot", status="used" if i < 40 else "pending")
    a = store.sample_examples("used", 10, seed=1)
    b = store.sample_examples("used", 10, seed=1)
    c = store.sample_examples("used", 10, seed=2)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    assert len({e.id for e in a}) == 10 and all(e.status == "used" for e in a)
    assert len(store.sample_examples("pending", 100)) == 10


def test_prune_by_status_and_age(store: Store) -> None:
    for i in range(4):
        store.add_example(f"q{i}", "a", method="cot", status="used" if i < 3 else "pending")
    assert store.prune_examples("used", older_than=utcnow() - timedelta(days=1)) == 0
    assert store.prune_examples("used", older_than=utcnow() + timedelta(seconds=1)) == 3
    assert store.count_examples() == 1


def test_export_import_round_trip(store: Store, tmp_path: Path) -> None:
    store.add_example("q1", "a1", method="cot", votes={"a1": 3}, agreement=0.75, tag="math")
    store.add_example("q2", "a2", method="rar", status="holdout")
    store.add_example("q3", "a3", method="bsm", status="used")
    path = tmp_path / "buffer.jsonl"
    assert store.export_examples(path) == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["votes"] == {"a1": 3} and lines[0]["created_at"].endswith("+00:00")
    assert {"id", "input", "target", "status", "kind", "dedup_key"} - set(lines[0]) == {"dedup_key"}
    buffer = io.StringIO()
    assert store.export_examples(buffer, status="holdout") == 1

    other = Store(tmp_path / "other.db")
    assert other.import_examples(path) == 3
    assert other.import_examples(path) == 0  # all duplicates now
    rows = other.list_examples()
    assert [(e.input, e.target, e.method, e.status, e.tag, e.kind) for e in rows] == [
        ("q1", "a1", "cot", "pending", "math", "import"),
        ("q2", "a2", "rar", "holdout", None, "import"),
        ("q3", "a3", "bsm", "used", None, "import"),
    ]
    assert rows[0].votes == {"a1": 3} and rows[0].agreement == 0.75
    other.close()


def test_import_plain_input_target_lines(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(
        '{"input": "2+2?", "target": "4"}\n'
        "\n"
        '{"input": "3+3?", "answer": "6", "tag": "math"}\n'
        '{"input": "2 + 2?", "target": "4"}\n'  # a different question: whitespace inside differs
        '{"input": "2+2?  ", "target": "4"}\n'  # a duplicate of the first line
    )
    assert store.import_examples(path) == 3
    assert store.count_examples("pending") == 3
    assert {e.kind for e in store.list_examples()} == {ExampleKind.IMPORT}


def test_bad_import_lists_every_bad_line_and_imports_nothing(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"input": "ok", "target": "fine"}\n'  # 1 good
        "{not json\n"  # 2
        '{"input": "no target"}\n'  # 3
        '{"input": "", "target": "x"}\n'  # 4
        '{"input": "q", "target": 4}\n'  # 5
        '{"input": "q", "target": "a", "status": "done"}\n'  # 6
        '["a", "list"]\n'  # 7
        '{"input": "q", "target": "a", "agreement": "high", "votes": [1]}\n'  # 8
    )
    with pytest.raises(ImportValidationError) as info:
        store.import_examples(path)
    error = info.value
    assert [n for n, _ in error.errors] == [2, 3, 4, 5, 6, 7, 8]
    message = str(error)
    for expected in ("line 2: not valid JSON", "line 3: missing 'target'", "line 4: 'input' must be a non-empty",
                     "line 5: 'target' must be", "line 6: 'status' must be one of", "line 7: expected a JSON object",
                     "line 8: 'votes' must be an object"):  # fmt: skip
        assert expected in message
    assert "agreement" in dict(error.errors)[8]
    assert store.count_examples() == 0
