"""Background consolidation (APScheduler 3) on the tiny real model, a real SQLite file and real processes.

Training runs in the scheduler's thread while ``Agent.answer`` keeps serving; runs never overlap, in one
process (APScheduler's ``max_instances=1`` and the scheduler's own lock) or across processes (the store's
consolidation lock); ``shutdown()`` stops a training at a safe point and changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import Agent
from agent.cli import main as cli
from tests.fakes import QUESTIONS, make_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_consolidate_worker.py")


@pytest.fixture
def config(tiny_model_dir, db_url, arith):
    return make_config(tiny_model_dir, db_url)


def wait_for(condition, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_runs_never_overlap(agent: Agent) -> None:
    runs = sorted(agent.store.list_runs(limit=None), key=lambda r: r.started_at)
    assert runs and all(r.finished_at is not None for r in runs)
    for earlier, later in zip(runs, runs[1:]):
        assert earlier.finished_at <= later.started_at


def schedule_status(capsys, db: str) -> dict:
    capsys.readouterr()
    assert cli(["--db", db, "schedule", "status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_interval_consolidates_in_the_background_while_answers_keep_coming(config):
    config.scheduler.interval_minutes = 0.02  # every 1.2 s: the trigger fires again while a run trains
    config.consolidation.epochs = 12
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        scheduler = agent.start_scheduler()
        served_while_training = refused = 0
        deadline = time.monotonic() + 60
        while not (scheduler.last_report and scheduler.last_report.status == "promoted"):
            assert time.monotonic() < deadline, "no background run was promoted within 60 s"
            was_running = scheduler.running
            answer = agent.answer(QUESTIONS[0], route="system1")  # serving goes on: never blocked, never failing
            assert answer.text is not None and answer.adapter_version is None
            if was_running and scheduler.running:
                served_while_training += 1
                refused += scheduler.run_now(trigger="test") is None  # a second run in this process: refused
            last = agent.store.last_run()
            assert last is None or last.status in ("running", "promoted"), last.reason
        assert served_while_training >= 3 and refused >= 1
        assert agent.answer("What is 2 + 3?", route="system1").adapter_version == 1  # hot-swapped, no restart
        time.sleep(1.5)  # the interval fires again: nothing left to train on, so it skips without a run
        assert [r.status for r in agent.store.list_runs()] == ["promoted"]
        assert_runs_never_overlap(agent)


def test_pending_trigger_consolidates_and_schedule_status_shows_the_run(config, capsys):
    config.scheduler.min_pending = 8
    config.scheduler.check_seconds = 0.2
    with Agent(config) as agent:
        scheduler = agent.start_scheduler()
        for q in QUESTIONS[:6]:
            agent.answer(q)
        time.sleep(0.6)  # three checks: 6 pending is not enough
        assert agent.store.list_runs() == [] and not scheduler.running
        for q in QUESTIONS[6:16]:
            agent.answer(q)
        # One run, or two when the first check came while the answers were still arriving; then it is quiet.
        wait_for(lambda: agent.store.count_examples(status="pending") < 8 and agent.store.list_runs()
                 and not scheduler.running, what="the pending examples to be consolidated")
        runs = agent.store.list_runs()  # newest first
        assert runs and {r.status for r in runs} == {"promoted"}
        assert_runs_never_overlap(agent)
        assert scheduler.status()["last"]["status"] == "promoted"
        info = schedule_status(capsys, config.db)
        assert info["last_run"]["status"] == "promoted" and info["last_run"]["id"] == runs[0].id
        assert info["last_run"]["adapter_version"] == agent.serving_version() == runs[0].adapter_version
        assert info["pending"] == agent.store.count_examples(status="pending") and info["running"] is None


@pytest.fixture
def lock_holder(config):
    """Another process holding the store's consolidation lock (released on a line on stdin)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(WORKER), "hold", config.db, "other-process"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == "acquired"  # type: ignore[union-attr]
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_consolidation_in_another_process_makes_this_one_skip(config, lock_holder, capsys):
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate()
        assert report.status == "skipped"
        assert f"pid {lock_holder.pid} on {socket.gethostname()}" in report.reason
        scheduled = agent.start_scheduler().run_now(trigger="test")  # the scheduler's runs skip the same way
        assert scheduled is not None and scheduled.status == "skipped" and str(lock_holder.pid) in scheduled.reason
        assert agent.store.list_runs() == [] and agent.store.count_examples(status="pending") == len(QUESTIONS)
        assert schedule_status(capsys, config.db)["running"] == f"pid {lock_holder.pid} on {socket.gethostname()}"

        lock_holder.stdin.write("release\n")  # type: ignore[union-attr]
        lock_holder.stdin.flush()  # type: ignore[union-attr]
        assert lock_holder.wait(timeout=10) == 0
        assert agent.consolidate().status == "promoted"


def test_shutdown_stops_a_running_training_at_a_safe_point(config):
    config.scheduler.interval_minutes = 0.01
    config.consolidation.epochs = 1000  # far longer than the test: only shutdown ends it
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        scheduler = agent.start_scheduler()
        # A run heartbeats its lock every 10 training steps: a fresher heartbeat means training is under way.
        wait_for(lambda: (h := agent.store.lock_holder("consolidation")) and h.heartbeat_at > h.acquired_at,
                 what="the scheduled run to train")
        started = time.monotonic()
        scheduler.shutdown()
        assert time.monotonic() - started < 10 and not scheduler.running
        [run] = agent.store.list_runs()
        assert run.status == "failed" and "stopped" in run.reason and run.adapter_version is None
        assert scheduler.last_report.status == "failed"
        assert agent.store.list_adapters() == [] and agent.serving_version() is None
        assert not list(agent.config.adapters_path().iterdir())  # the half-trained folder is gone
        assert agent.store.count_examples(status="used") == 0
        assert agent.store.count_examples(status="pending") == scheduler.last_report.n_new  # kept for next time
        assert agent.store.lock_holder("consolidation") is None
        assert agent.answer(QUESTIONS[0], route="system1").adapter_version is None  # still serving
