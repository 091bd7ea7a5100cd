"""Consolidation runs, crash reaping with a really dead pid, and the lock across real processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from store import Store, StoreError

Spawn = Callable[..., "subprocess.Popen[str]"]


def test_start_finish_list(store: Store) -> None:
    first = store.start_run(scope="math", config={"lr": 1e-4})
    second = store.start_run()
    run = store.finish_run(first, "promoted", n_train=90, n_holdout=10, metrics={"acc": 0.8}, adapter_version=1,
                           reason="holdout accuracy 0.80 >= 0.75")  # fmt: skip
    assert run.status == "promoted" and run.finished_at is not None
    runs = store.list_runs()
    assert [r.id for r in runs] == [second, first]
    assert runs[1].pid == os.getpid() and runs[1].host and runs[1].config == {"lr": 1e-4}
    assert runs[1].metrics == {"acc": 0.8} and runs[1].scope == "math"
    assert store.last_run().id == second  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="cannot have status 'running'"):
        store.finish_run(second, "running")
    with pytest.raises(StoreError, match="run status must be one of"):
        store.finish_run(second, "great")
    with pytest.raises(StoreError, match="no consolidation run"):
        store.finish_run(12345, "failed")


def test_last_runs_by_scope_gives_each_scope_its_newest_run(store: Store) -> None:
    assert store.last_runs_by_scope() == {}
    old_math = store.start_run(scope="math")
    store.finish_run(old_math, "rejected")
    general = store.start_run()
    new_math = store.start_run(scope="math")
    store.finish_run(new_math, "promoted")
    last = store.last_runs_by_scope()
    assert {scope: (run.id, run.status) for scope, run in last.items()} == {
        "math": (new_math, "promoted"), None: (general, "running")}


def test_reap_crashed_runs_with_a_dead_pid(store: Store, store_url: str, spawn: Spawn) -> None:
    alive = store.start_run()
    proc = spawn(store_url, "start_run")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    crashed = int(out.strip())
    dead_pid = proc.pid  # exited and reaped: no process has this pid now
    assert store.list_runs()[0].pid == dead_pid
    assert store.reap_crashed_runs() == [crashed]
    run = {r.id: r for r in store.list_runs()}
    assert run[crashed].status == "crashed" and str(dead_pid) in (run[crashed].reason or "")
    assert run[alive].status == "running"  # this process is alive
    assert store.reap_crashed_runs() == []


def test_lock_in_one_process(store: Store) -> None:
    assert store.lock_holder("consolidate") is None
    assert store.acquire_lock("consolidate", "me")
    assert store.acquire_lock("consolidate", "me")  # re-entrant for the same owner and process
    assert not store.acquire_lock("consolidate", "someone else")
    holder = store.lock_holder("consolidate")
    assert holder is not None and holder.owner == "me" and holder.pid == os.getpid()
    store.heartbeat("consolidate", "me")
    with pytest.raises(StoreError, match="not held by 'someone else'"):
        store.heartbeat("consolidate", "someone else")
    store.release_lock("consolidate", "someone else")  # not theirs: nothing happens
    assert store.lock_holder("consolidate") is not None
    store.release_lock("consolidate", "me")
    assert store.lock_holder("consolidate") is None


def test_lock_across_processes(store: Store, store_url: str, spawn: Spawn) -> None:
    holder = spawn(store_url, "hold", "consolidate", "scheduler")
    assert holder.stdout is not None and holder.stdout.readline().strip() == "acquired"
    assert not store.acquire_lock("consolidate", "cli")  # held by a live process
    assert store.lock_holder("consolidate").pid == holder.pid  # type: ignore[union-attr]
    holder.communicate("release\n", timeout=30)
    assert holder.returncode == 0
    assert store.lock_holder("consolidate") is None
    assert store.acquire_lock("consolidate", "cli")
    store.release_lock("consolidate", "cli")


def test_lock_of_a_dead_process_is_taken_over(store: Store, store_url: str, spawn: Spawn) -> None:
    grabber = spawn(store_url, "grab", "consolidate", "doomed")
    out, err = grabber.communicate(timeout=30)
    assert out.strip() == "acquired", err
    assert store.lock_holder("consolidate").owner == "doomed"  # type: ignore[union-attr]
    assert store.acquire_lock("consolidate", "survivor", ttl_s=3600)  # heartbeat fresh, but its pid is dead
    assert store.lock_holder("consolidate").owner == "survivor"  # type: ignore[union-attr]


def test_stale_lock_is_taken_over_and_the_old_holder_learns_it(store: Store, store_url: str, spawn: Spawn) -> None:
    holder = spawn(store_url, "hold", "consolidate", "slow")
    assert holder.stdout is not None and holder.stdout.readline().strip() == "acquired"
    time.sleep(0.05)
    assert store.acquire_lock("consolidate", "impatient", ttl_s=0.01)  # alive, but no heartbeat for too long
    assert store.lock_holder("consolidate").owner == "impatient"  # type: ignore[union-attr]
    holder.communicate("release\n", timeout=30)  # its release only logs: the lock is no longer its own
    assert store.lock_holder("consolidate").owner == "impatient"  # type: ignore[union-attr]


def test_only_one_of_two_racing_processes_gets_the_lock(tmp_path: Path, store: Store, store_url: str, spawn: Spawn) -> None:
    go = tmp_path / "go"
    racers = [spawn(store_url, "race", str(go), "consolidate", f"racer-{i}") for i in range(2)]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    go.touch()
    results = [racer.stdout.readline().strip() for racer in racers]  # type: ignore[union-attr]
    for racer in racers:
        _, err = racer.communicate("exit\n", timeout=30)
        assert racer.returncode == 0, err
    assert sorted(results) == ["False", "True"]
