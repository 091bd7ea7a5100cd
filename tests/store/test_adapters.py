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
