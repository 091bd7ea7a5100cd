"""``kill -9`` at any moment of a consolidation, or of a store write, loses nothing and leaves the store consistent.

Real processes (``_consolidate_worker.py``), a real SQLite file and the tiny real model. A consolidation
is killed while it imports, while it trains, while its adapter folder is being written, between the
folder's rename and the registry commit, and around that commit. After every kill: each accepted
example is still there, every registry row points to a complete adapter folder, at most one adapter
serves per scope, and a fresh Agent on the same database cleans up after the dead run.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from safetensors.torch import load_file

from agent import Agent
from agent.consolidation import cleanup_after_crash
from store import Store
from tests.fakes import make_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_consolidate_worker.py")
ACCEPTED = ("pending", "used", "holdout")


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``_consolidate_worker.py MODE ...`` in a fresh interpreter; whatever is left is killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def start(*args: object) -> subprocess.Popen[str]:
        started.append(subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        return started[-1]

    yield start
    for proc in started:  # only the processes this test started
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def read_until(proc: subprocess.Popen[str], wanted: str, timeout: float = 60) -> list[str]:
    """Lines the worker printed, up to and including the first that starts with ``wanted``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"worker exited before printing {wanted!r}: {lines[-5:]}")
        lines.append(line.strip())
        if line.startswith(wanted):
            return lines
    raise AssertionError(f"no {wanted!r} from the worker within {timeout} s")


def kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def add_questions(store: Store, start: int, n: int) -> None:
    for a in range(start, start + n):
        store.add_example(f"What is {a} + {a + 29}?", str(2 * a + 29), method="arith", agreement=1.0)


def accepted_examples(store: Store) -> dict[int, tuple[str, str]]:
    return {e.id: (e.input, e.target) for e in store.list_examples(status=list(ACCEPTED))}


def assert_consistent(store: Store, accepted: dict[int, tuple[str, str]]) -> None:
    """The invariants a kill at any moment must keep."""
    assert accepted_examples(store) == accepted  # no accepted example lost or changed
    adapters = store.list_adapters()
    by_version = {a.version: a for a in adapters}
    for row in adapters:  # every row points to a complete, loadable adapter
        assert row.status in ("promoted", "candidate", "rejected")
        folder = Path(row.path)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        assert load_file(str(folder / "adapter_model.safetensors"))
        assert not folder.name.startswith(".tmp-")
    serving = [a.scope for a in adapters if a.serving]
    assert len(serving) == len(set(serving))  # at most one serving adapter per scope
    for e in store.list_examples(status="used"):  # examples are used only by an adapter that was promoted
        assert by_version[e.adapter_version].status == "promoted"
    for row in adapters:  # an adapter and its run's outcome were committed together
        assert store.get_run(row.run_id).status == row.status
    if any(a.status == "promoted" for a in adapters):
        promoted = max(a.version for a in adapters if a.status == "promoted")
        assert by_version[promoted].serving
        # everything a promoted adapter trained on is used, not pending (else the next run trains on it again)
        assert not {e.id for e in store.list_examples(status="pending")} & {
            e.id for e in store.list_examples(status="used")}


def recover(model_dir: Path, db: Path) -> tuple[list[int], list[str]]:
    """A fresh Agent on the same database starts, and cleans up after the killed run."""
    with Agent(make_config(model_dir, db)) as agent:
        crashed = cleanup_after_crash(agent)
        left = sorted(p.name for p in agent.config.adapters_path().glob("*") if p.is_dir()) \
            if agent.config.adapters_path().is_dir() else []  # adapter folders (beside them: the answer cache)
        for run_id in crashed:
            run = agent.store.get_run(run_id)
            assert run.status == "crashed" and "exited without finishing" in run.reason
        assert not [r for r in agent.store.list_runs(limit=None) if r.status == "running"]
        assert agent.store.lock_holder("consolidation") is None
    return crashed, left


def test_kill_9_at_every_stage_of_a_consolidation(tiny_model_dir, tmp_path, db_url, arith, spawn):
    db = db_url  # a SQLite file in tmp_path, or a PostgreSQL database; the adapters go to tmp_path either way
    adapters = tmp_path / "adapters"
    store = Store(db)
    add_questions(store, 11, 24)
    next_question = 35
    stages = ["training", "writing the adapter folder", "committing (paused)", "committed"]
    kills: list[str] = []

    def start(stage: str) -> tuple[str, subprocess.Popen[str]]:
        return stage, spawn("consolidate", tiny_model_dir, db, 2, 30 if stage == "committing (paused)" else 0)

    # Importing torch is most of a worker's life: the next worker loads while this one runs and is killed.
    loading = [start(stage) for stage in stages[:2]]

    def run_and_kill(stage: str) -> None:
        nonlocal next_question
        if store.count_examples(status="pending") < 12:  # the last run used them: give the next one work
            add_questions(store, next_question, 16)
            next_question += 16
        before = accepted_examples(store)
        loaded_for, proc = loading.pop(0)
        assert loaded_for == stage
        if len(kills) + 2 < len(stages):
            loading.append(start(stages[len(kills) + 2]))
        read_until(proc, "ready")
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        if stage == "training":
            read_until(proc, "step 3")
            [run] = [r for r in store.list_runs() if r.status == "running"]
            assert run.pid == proc.pid
        elif stage == "writing the adapter folder":
            read_until(proc, "step 6")  # the last step; save_pretrained creates the .tmp- folder next
            while not list(adapters.glob(".tmp-*")):
                assert proc.poll() is None
                time.sleep(0.001)
        else:
            read_until(proc, "committing")  # the folder is in place; the registry transaction comes next
            while stage == "committed" and not store.list_adapters():
                time.sleep(0.001)
        kill9(proc)
        kills.append(stage)
        assert_consistent(store, before)

    proc = spawn("consolidate", tiny_model_dir, db, 2)
    time.sleep(0.5)
    kill9(proc)  # while it imports
    assert_consistent(store, accepted_examples(store))
    assert recover(tiny_model_dir, db) == ([], [])

    run_and_kill("training")
    crashed, left = recover(tiny_model_dir, db)
    assert len(crashed) == 1 and left == []

    run_and_kill("writing the adapter folder")
    assert [p.name for p in adapters.glob(".tmp-*")]  # half-written, and no row points at it
    crashed, left = recover(tiny_model_dir, db)
    assert len(crashed) == 1 and left == []

    run_and_kill("committing (paused)")
    assert (adapters / "v1").is_dir() and store.list_adapters() == []  # renamed into place, never registered
    crashed, left = recover(tiny_model_dir, db)
    assert len(crashed) == 1 and left == []  # the unregistered folder is gone; v1 is free again

    run_and_kill("committed")  # just after the registry transaction: all of it is there
    assert [(a.version, a.status, a.serving) for a in store.list_adapters()] == [(1, "promoted", True)]
    assert recover(tiny_model_dir, db) == ([], ["v1"])  # nothing to reap: the transaction finished the run
    assert kills == stages and not loading

    # After all that, a consolidation completes on the same database and serves its adapter.
    add_questions(store, next_question, 16)
    with Agent(make_config(tiny_model_dir, db)) as agent:
        used = agent.store.count_examples(status="used")
        report = agent.consolidate()
        assert report.status == "promoted", report.reason
        assert agent.serving_version() == report.adapter_version
        assert agent.store.count_examples(status="used") == used + report.n_new
        assert agent.store.last_run().status == "promoted"
    assert_consistent(store, accepted_examples(store))
    assert sorted(p.name for p in adapters.iterdir() if p.is_dir()) == [f"v{a.version}" for a in store.list_adapters()]
    store.close()


@pytest.mark.parametrize("rows_before_kill", [1, 40, 150])
def test_kill_9_during_store_writes_keeps_every_returned_row(db_url, spawn, rows_before_kill):
    db = db_url
    Store(db).close()
    proc = spawn("write", db, "writer")
    read_until(proc, "ready")
    lines: list[str] = []
    while sum(line.startswith("example ") for line in lines) < rows_before_kill:
        lines += read_until(proc, "example ")
    kill9(proc)  # most likely in the middle of a write
    lines += [line.strip() for line in proc.stdout.read().splitlines()]  # type: ignore[union-attr]
    returned = {kind: {int(line.split()[1]) for line in lines if line.startswith(kind + " ")}
                for kind in ("example", "interaction")}
    assert len(returned["example"]) >= rows_before_kill

    if "://" not in db:  # a SQLite file: it survived the kill intact
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
    with Store(db) as store:
        assert returned["example"] <= {e.id for e in store.list_examples()}
        assert returned["interaction"] <= {i.id for i in store.list_interactions(limit=None)}
        store.add_example("after the kill", "ok", method="arith")  # the database takes writes again
