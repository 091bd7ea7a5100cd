"""The adapter registry: one serving adapter per scope, promotion, rollback and pruning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from store import Store, StoreError


def _register(store: Store, tmp_path: Path, version: int, parent: int | None, scope: str | None = None, **kw: object):
    folder = tmp_path / "adapters" / f"v{version}"
    folder.mkdir(parents=True)
    return store.register_adapter(version, str(folder), parent, scope=scope, **kw)  # type: ignore[arg-type]


def test_register_and_promote_one_serving_per_scope(store: Store, tmp_path: Path) -> None:
    assert store.next_adapter_version() == 1 and store.serving_adapter() is None
    _register(store, tmp_path, 1, None, metrics={"acc": 0.6}, n_train=100)
    assert store.next_adapter_version() == 2
    assert store.serving_adapter() is None  # candidates do not serve
    store.promote_adapter(1)
    _register(store, tmp_path, 2, 1)
    _register(store, tmp_path, 3, None, scope="math")
    store.promote_adapter(3)
    store.promote_adapter(2)
    general, math = store.serving_adapter(), store.serving_adapter("math")
    assert general is not None and general.version == 2 and general.promoted_at is not None
    assert math is not None and math.version == 3
    assert [(a.version, a.serving, a.status) for a in store.list_adapters()] == [
        (1, False, "promoted"), (2, True, "promoted"), (3, True, "promoted"),
    ]  # fmt: skip
    assert [a.version for a in store.list_adapters(scope=None)] == [1, 2]
    assert [a.version for a in store.list_adapters(scope="math")] == [3]
    v1 = store.get_adapter(1)
    assert v1 is not None and v1.metrics == {"acc": 0.6} and v1.n_train == 100
    with pytest.raises(StoreError, match="already registered"):
        _register(store, tmp_path / "again", 1, None)
    with pytest.raises(StoreError, match="no such version"):
        store.promote_adapter(99)


def test_update_adapter(store: Store, tmp_path: Path) -> None:
    _register(store, tmp_path, 1, None)
    row = store.update_adapter(1, status="rejected", metrics={"acc": 0.1})
    assert row.status == "rejected" and store.get_adapter(1).metrics == {"acc": 0.1}  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="cannot set"):
        store.update_adapter(1, serving=True)
    with pytest.raises(StoreError, match="status must be one of"):
        store.update_adapter(1, status="great")
    with pytest.raises(StoreError, match="no adapter version 7"):
        store.update_adapter(7, n_train=1)


def test_rollback_along_the_parent_chain(store: Store, tmp_path: Path) -> None:
    for version, parent in ((1, None), (2, 1), (3, 2)):
        _register(store, tmp_path, version, parent)
        store.promote_adapter(version)
    store.update_adapter(2, status="rejected")  # v2 turned out bad: rollback skips it
    back = store.rollback()
    assert back is not None and back.version == 1
    assert store.serving_adapter().version == 1  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="no earlier servable adapter.*version=0"):
        store.rollback()
    assert store.rollback(version=3).version == 3  # type: ignore[union-attr]
    shutil.rmtree(tmp_path / "adapters" / "v1")
    with pytest.raises(StoreError, match="files are gone"):
        store.rollback(version=1)
    with pytest.raises(StoreError, match="v2 was never promoted|status 'rejected'"):
        store.rollback(version=2)
    assert store.serving_adapter().version == 3  # type: ignore[union-attr]  # failed rollbacks changed nothing
    assert store.rollback(version=0) is None
    assert store.serving_adapter() is None
    with pytest.raises(StoreError, match="no adapter serves"):
        store.rollback()


def test_rollback_targets_list_what_a_rollback_may_serve_and_change_nothing(store: Store, tmp_path: Path) -> None:
    """A runtime loads a target's weights before it commits: the store names the candidates, nearest first."""
    for version, parent in ((1, None), (2, 1), (3, 2), (4, 3)):
        _register(store, tmp_path, version, parent)
        store.promote_adapter(version)
    shutil.rmtree(tmp_path / "adapters" / "v2")  # its folder is gone: not a target
    assert [a.version for a in store.rollback_targets()] == [3, 1]
    assert [a.version for a in store.rollback_targets(version=1)] == [1]
    assert store.rollback_targets(version=0) == []
    with pytest.raises(StoreError, match="files are gone"):
        store.rollback_targets(version=2)
    with pytest.raises(StoreError, match="no such version"):
        store.rollback_targets(version=9)
    with pytest.raises(StoreError, match="no adapter serves"):
        store.rollback_targets(scope="math")
    assert store.serving_adapter().version == 4  # type: ignore[union-attr]
    assert store.rollback(version=1).version == 1  # type: ignore[union-attr]  # the commit, with the one that loaded
    with pytest.raises(StoreError, match="no earlier servable adapter"):
        store.rollback_targets()


def test_rollback_to_base_is_per_scope(store: Store, tmp_path: Path) -> None:
    _register(store, tmp_path, 1, None)
    _register(store, tmp_path, 2, None, scope="math")
    store.promote_adapter(1)
    store.promote_adapter(2)
    store.rollback(version=0, scope="math")
    assert store.serving_adapter("math") is None and store.serving_adapter().version == 1  # type: ignore[union-attr]


def test_prune_keeps_serving_and_newest(store: Store, tmp_path: Path) -> None:
    run = store.start_run()
    for version in range(1, 6):
        _register(store, tmp_path, version, version - 1 or None)
        store.promote_adapter(version)
    _register(store, tmp_path, 6, 5, status="rejected")
    _register(store, tmp_path, 7, 5, run_id=run)  # the candidate of a running consolidation
    _register(store, tmp_path, 8, None, scope="math")
    store.promote_adapter(8)
    store.rollback(version=4)  # serving v4; v5 is newer but not serving
    pruned = store.prune_adapters(keep=2)
    assert sorted(a.version for a in pruned) == [1, 2, 6]
    assert all(a.files_deleted for a in pruned) and {a.status for a in pruned} == {"retired", "rejected"}
    by_version = {a.version: a for a in store.list_adapters()}
    assert by_version[4].serving and not by_version[4].files_deleted
    assert not by_version[3].files_deleted and not by_version[5].files_deleted and not by_version[8].files_deleted
    assert by_version[7].status == "candidate" and not by_version[7].files_deleted
    assert store.prune_adapters(keep=2) == []  # already pruned
    with pytest.raises(StoreError, match="files are gone"):
        store.rollback(version=1)
    store.finish_run(run, "rejected")
    assert [a.version for a in store.prune_adapters(keep=2)] == [7]  # its run is over now
    assert [a.version for a in store.prune_adapters(keep=0)] == [5, 3]
    assert store.serving_adapter().version == 4  # type: ignore[union-attr]


def test_commit_adapter_records_a_consolidation_in_one_transaction(store: Store, tmp_path: Path) -> None:
    ids = [store.add_example(f"q{i}", "a", method="cot")[0].id for i in range(4)]
    _register(store, tmp_path, 1, None)
    store.promote_adapter(1)
    run = store.start_run()
    (tmp_path / "adapters" / "v2").mkdir()
    row = store.commit_adapter(2, str(tmp_path / "adapters" / "v2"), 1, promote=True, metrics={"acc": 1.0},
                               n_train=3, run_id=run, used_examples=ids[:3], reason="passed", n_holdout=1)
    assert row.status == "promoted" and store.serving_adapter().version == 2  # type: ignore[union-attr]
    assert [(e.status, e.adapter_version) for e in store.list_examples()] == [("used", 2)] * 3 + [("pending", None)]
    finished = store.get_run(run)
    assert finished is not None and (finished.status, finished.adapter_version, finished.reason) == ("promoted", 2, "passed")
    assert (finished.n_train, finished.n_holdout, finished.metrics) == (3, 1, {"acc": 1.0})

    rejected_run = store.start_run(scope="math")
    store.commit_adapter(3, str(tmp_path / "v3"), None, promote=False, scope="math", run_id=rejected_run,
                         used_examples=ids[3:], reason="gate failed")
    assert store.get_adapter(3).status == "rejected" and store.serving_adapter("math") is None  # type: ignore[union-attr]
    assert store.get_example(ids[3]).status == "pending"  # type: ignore[union-attr]
    assert store.get_run(rejected_run).status == "rejected"  # type: ignore[union-attr]

    # A failing transaction changes nothing: the version is taken, so no serving flip, no example marked used.
    with pytest.raises(StoreError, match="already registered"):
        store.commit_adapter(2, str(tmp_path / "x"), 1, promote=True, used_examples=ids[3:], run_id=rejected_run)
    assert store.get_example(ids[3]).status == "pending"  # type: ignore[union-attr]
    assert store.get_run(rejected_run).status == "rejected"  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="no consolidation run 99"):
        store.commit_adapter(4, str(tmp_path / "v4"), 2, promote=True, used_examples=ids[3:], run_id=99)
    assert store.get_adapter(4) is None and store.serving_adapter().version == 2  # type: ignore[union-attr]
    assert store.get_example(ids[3]).status == "pending"  # type: ignore[union-attr]
