"""Background consolidation (APScheduler 3) on the tiny real model, a real SQLite file and real processes.

Training runs in a niced child process (the default) or in the scheduler's thread while ``Agent.answer``
keeps serving; runs never overlap, in one process (APScheduler's ``max_instances=1`` and the scheduler's own
lock) or across processes (the store's consolidation lock); ``shutdown()`` stops a training at a safe point
and changes nothing; ``agent serve`` starts the scheduler unless ``--no-train``, and SIGTERM to it stops a
running child.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import Agent
from agent.cli import main as cli
from agent.metrics import Metrics, store_snapshot
from store import Store
from tests.conftest import wait_for
from tests.fakes import QUESTIONS, make_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_consolidate_worker.py")


@pytest.fixture
def config(tiny_model_dir, db_url, arith):
    config = make_config(tiny_model_dir, db_url)
    config.scheduler.process = "thread"  # the child process has tests of its own below
    return config


def not_inside_a_write(db: str) -> bool:
    """Whether a write transaction could start now: a process frozen inside one (a heartbeat) would keep the
    SQLite file locked, and every other process opening the store would wait for it. PostgreSQL readers
    never wait for writers."""
    if "://" in db:
        return True
    conn = sqlite3.connect(db, timeout=0.05)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


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


def test_pending_trigger_consolidates_and_schedule_status_shows_the_run(config, capsys, caplog):
    config.scheduler.min_pending = 8
    config.scheduler.check_seconds = 0.2
    config.scheduler.cooldown_minutes = 0  # a second run may follow the first at once; the cooldown has its own test
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
    # checks fell due every 0.2 s while the run took seconds: by design, not a WARNING each time
    assert not [r for r in caplog.records if "maximum number of running instances" in r.getMessage()]


def test_a_scope_cools_down_after_a_run_before_the_pending_trigger_starts_the_next(config):
    """Examples that arrive during a run are enough for the next one in a busy scope; back to back, runs would
    keep the cores they are lent for good. The pending trigger waits ``cooldown_minutes`` after a run ends."""
    config.scheduler.min_pending = 6
    config.scheduler.check_seconds = 0.2
    config.scheduler.interval_minutes = None
    config.scheduler.cooldown_minutes = 0.05  # 3 s
    config.consolidation.min_examples = 4
    with Agent(config) as agent:
        scheduler = agent.start_scheduler()
        for q in QUESTIONS[:8]:
            agent.answer(q)
        wait_for(lambda: len(agent.store.list_runs()) == 1 and not scheduler.running, what="the first run")
        first = agent.store.list_runs()[0]
        for q in QUESTIONS[8:16]:
            agent.answer(q)
        time.sleep(1.0)  # five checks with 8 pending: the scope is cooling down
        if len(agent.store.list_runs()) == 1:  # (a slow machine may have taken longer than the cooldown already)
            assert agent.store.count_examples(status="pending") >= 6
        wait_for(lambda: len(agent.store.list_runs()) == 2 and not scheduler.running, what="the second run")
        second = agent.store.list_runs()[0]
        assert (second.started_at - first.finished_at).total_seconds() >= 3.0
        assert_runs_never_overlap(agent)


def test_the_pending_trigger_waits_until_enough_of_the_pending_examples_would_train(config):
    """``min_pending`` counts the holdout share too; a run with fewer than ``min_examples`` to train on would
    only start (a child process, a model load) to skip, so the trigger waits for them."""
    config.scheduler.min_pending = 4
    config.scheduler.check_seconds = 0.2
    config.scheduler.interval_minutes = None
    config.consolidation.min_examples = 12
    with Agent(config) as agent:
        scheduler = agent.start_scheduler()
        for q in QUESTIONS[:10]:
            agent.answer(q)
        time.sleep(0.6)  # three checks: 10 pending, at most 10 of them to train on
        assert scheduler.last_report is None and agent.store.list_runs() == []
        for q in QUESTIONS[10:]:
            agent.answer(q)
        wait_for(lambda: scheduler.last_report is not None and not scheduler.running,
                 what="a run once enough examples would train")
        assert scheduler.last_report.status == "promoted", scheduler.last_report.reason
        assert scheduler.last_report.n_new >= 12


def test_a_rejected_scope_is_tried_again_only_once_min_pending_new_examples_arrived(config):
    """A rejected run leaves its examples pending: the same data, every check, would train the same rejected
    candidate again and again."""
    config.scheduler.min_pending = 4
    config.scheduler.check_seconds = 0.2
    config.scheduler.interval_minutes = None
    config.scheduler.cooldown_minutes = 0  # runs back to back here; the cooldown has a test of its own
    # a candidate trained on sums at this learning rate regenerates some of 32 retention answers differently
    config.consolidation.retention_threshold, config.consolidation.retention_measure = 1.0, "text"
    config.consolidation.retention_prompts = 64
    with Agent(config) as agent:
        for q in QUESTIONS[:8]:  # before the scheduler starts, so that its first run trains on all of them
            agent.answer(q)
        scheduler = agent.start_scheduler()
        wait_for(lambda: agent.store.list_runs() and not scheduler.running, what="the first run")
        assert [r.status for r in agent.store.list_runs()] == ["rejected"]
        for q in QUESTIONS[8:11]:
            agent.answer(q)
        time.sleep(1.0)  # five checks: 11 pending, but only 3 new since the rejected run
        assert len(agent.store.list_runs()) == 1 and not scheduler.running
        agent.answer(QUESTIONS[11])
        wait_for(lambda: len(agent.store.list_runs()) == 2 and not scheduler.running, what="the second run")
        assert agent.store.list_runs()[0].status == "rejected"
        assert set(agent.store.last_runs_by_scope()) == {None}


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


@pytest.mark.parametrize("process", ["thread", "child"])
def test_shutdown_stops_a_running_training_at_a_safe_point(config, process):
    config.scheduler.process = process
    config.scheduler.interval_minutes = 0.01
    config.consolidation.epochs = 1000  # far longer than the test: only shutdown ends it
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        scheduler = agent.start_scheduler()
        # A run heartbeats its lock every 10 training steps: a fresher heartbeat means training is under way.
        wait_for(lambda: (h := agent.store.lock_holder("consolidation")) and h.heartbeat_at > h.acquired_at,
                 timeout=30 if process == "thread" else 120, what="the scheduled run to train")
        started = time.monotonic()
        scheduler.shutdown()
        assert time.monotonic() - started < (10 if process == "thread" else 20) and not scheduler.running
        [run] = agent.store.list_runs()
        assert run.status == "failed" and "stopped" in run.reason and run.adapter_version is None
        assert scheduler.last_report.status == "failed"
        assert agent.store.list_adapters() == [] and agent.serving_version() is None
        assert not [p for p in agent.config.adapters_path().iterdir() if p.is_dir()]  # the half-trained folder is gone
        assert agent.store.count_examples(status="used") == 0
        assert agent.store.count_examples(status="pending") == scheduler.last_report.n_new  # kept for next time
        assert agent.store.lock_holder("consolidation") is None
        assert agent.answer(QUESTIONS[0], route="system1").adapter_version is None  # still serving


def test_a_stop_before_training_ends_the_run_during_its_retention_answers(config):
    stop = threading.Event()
    stop.set()  # as if SIGTERM came while the serving model answers the retention prompts
    with Agent(config) as agent:
        for q in QUESTIONS:
            agent.answer(q)
        report = agent.consolidate(stop=stop)
        assert report.status == "failed" and report.reason == "stopped before training by shutdown"
        assert "train_steps" not in report.metrics and agent.store.list_adapters() == []
        assert agent.store.count_examples(status="used") == 0 and agent.store.lock_holder("consolidation") is None


# --- the child process ---------------------------------------------------------------------------------------
def test_each_scope_consolidates_in_a_niced_child_and_its_adapter_serves_here_without_restart(config, caplog):
    config.consolidation.per_tag = True
    config.consolidation.epochs = 60  # long enough to watch the child hold the lock
    config.scheduler.process = "child"
    config.scheduler.train_threads = 1
    config.threads = 2  # serving lends the child one of them while it runs (scheduler.lend_cores)
    caplog.set_level(logging.INFO, logger="agent.backends.batching")
    config.scheduler.min_pending = 8
    config.scheduler.check_seconds = 0.2
    config.scheduler.interval_minutes = None
    with Agent(config) as agent:
        for q in QUESTIONS[:12]:
            agent.answer(q, tag="arith")
        for q in QUESTIONS[12:15]:
            agent.answer(q, tag="sums")  # 3 pending: below min_pending, no run for this scope
        scheduler = agent.start_scheduler()
        child = wait_for(lambda: scheduler.child, what="the consolidation process to start")
        assert child.pid != os.getpid()
        expected_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + config.scheduler.nice)
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, child.pid) == expected_nice, what="the child to renice")
        assert b"OMP_NUM_THREADS=1\0" in Path(f"/proc/{child.pid}/environ").read_bytes()
        assert b"--pause-fd" in Path(f"/proc/{child.pid}/cmdline").read_bytes()  # serving pauses it for users

        # While it trains, the child holds the store's lock: the CLI and /metrics show it; serving goes on.
        # The child is frozen (SIGSTOP) while it holds the lock, so a fast machine cannot finish the run
        # between the checks below.
        def frozen_holding_the_lock() -> bool:
            os.kill(child.pid, signal.SIGSTOP)
            holder = agent.store.lock_holder("consolidation")
            if holder is not None and holder.pid == child.pid and not_inside_a_write(config.db):
                return True
            os.kill(child.pid, signal.SIGCONT)
            return False

        wait_for(frozen_holding_the_lock, timeout=120, what="the child to take the consolidation lock")
        try:
            # From another process, as an operator would (and a second Store in this process would drop this
            # process's SQLite file locks: the child, exiting, would then delete the WAL under our connections).
            status = subprocess.run([sys.executable, "-m", "agent.cli", "--db", config.db, "schedule", "status", "--json"],
                                    cwd=REPO, capture_output=True, text=True, check=True)
            assert json.loads(status.stdout)["running"] == f"pid {child.pid} on {socket.gethostname()}"
            text = Metrics().render(store_snapshot(agent))
            assert "s2agent_consolidation_running 1" in text and f'pid="{child.pid}"' in text
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert agent.answer(QUESTIONS[0], tag="arith", route="system1").adapter_version is None

        wait_for(lambda: scheduler.last_report is not None and not scheduler.running, timeout=180,
                 what="the child's run to finish")
        assert scheduler.last_report.status == "promoted", scheduler.last_report.reason
        [run] = agent.store.list_runs()
        assert (run.scope, run.status, run.pid) == ("arith", "promoted", child.pid)  # trained in the child
        answer = agent.answer(QUESTIONS[0], tag="arith", route="system1")
        assert answer.adapter_version == run.adapter_version == 1  # the promotion serves here, no restart
        assert agent.answer(QUESTIONS[0], tag="sums", route="system1").adapter_version is None
        assert child.returncode == 0 and scheduler.child is None
        text = Metrics().render(store_snapshot(agent))
        assert "s2agent_consolidation_running 0" in text
        assert 's2agent_serving_adapter_version{scope="arith"} 1' in text
    lent = max(1, min(2, (os.cpu_count() or 1) - 1))
    assert [r.getMessage() for r in caplog.records if r.name == "agent.backends.batching"] == [
        f"serving computes with {lent} torch thread(s) (2 while users' requests pause the training process)",
        "serving computes with 2 torch thread(s)"]


def test_the_child_gets_the_effective_configuration(config, tmp_path, monkeypatch):
    """TOML < environment < flags, as the parent resolved them; the child reads neither file nor environment."""
    from agent.config import AgentConfig
    from agent.worker import child_config

    toml = tmp_path / "agent.toml"
    toml.write_text("[consolidation]\nrank = 8\nepochs = 5\n[system2]\nmethod = \"arith\"\n")
    monkeypatch.setenv("S2AGENT_CONSOLIDATION__EPOCHS", "7")
    parent = AgentConfig.load(toml, overrides={"consolidation.learning_rate": 0.05, "db": config.db})
    monkeypatch.setenv("S2AGENT_CONSOLIDATION__EPOCHS", "99")  # the child must not read the environment again
    child = child_config(json.loads(json.dumps(parent.to_dict())))
    assert (child.consolidation.rank, child.consolidation.epochs, child.consolidation.learning_rate) == (8, 7, 0.05)
    assert child.to_dict() | {"system2": None, "threads": None} == parent.to_dict() | {"system2": None, "threads": None}
    assert child.system2.method == AgentConfig().system2.method  # System 2 never runs there: the default will do
    assert child.threads == (parent.scheduler.train_threads or max(1, (os.cpu_count() or 2) // 2))


def test_sigterm_to_agent_serve_stops_its_consolidation_child_cleanly(config, tiny_model_dir, tmp_path):
    store = Store(config.db)
    for q in QUESTIONS[:12]:
        store.add_example(q, "0", method="arith", agreement=1.0)
    env = {"S2AGENT_THREADS": "1", "S2AGENT_MAX_NEW_TOKENS": "8", "S2AGENT_SCHEDULER__MIN_PENDING": "8",
           "S2AGENT_SCHEDULER__CHECK_SECONDS": "0.2", "S2AGENT_CONSOLIDATION__MIN_EXAMPLES": "4",
           "S2AGENT_CONSOLIDATION__EPOCHS": "1000", "S2AGENT_CONSOLIDATION__BATCH_SIZE": "8",
           "S2AGENT_CONSOLIDATION__RANK": "4", "S2AGENT_CONSOLIDATION__RETENTION_PROMPTS": "8"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "agent.cli", "--db", config.db, "--model", str(tiny_model_dir),
               "--log-level", "INFO", "serve", "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        holder = wait_for(lambda: server.poll() is None and (h := store.lock_holder("consolidation"))
                          and h.heartbeat_at > h.acquired_at and h, timeout=180, what="a consolidation to train")
        assert holder.pid != server.pid and Path(f"/proc/{holder.pid}").exists()  # a child of the server trains
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    output = log.read_text()
    assert server.returncode == 0, output
    assert "in a child process" in output
    wait_for(lambda: not Path(f"/proc/{holder.pid}").exists(), timeout=10, what="the child to be gone")
    [run] = store.list_runs()
    assert run.pid == holder.pid and run.status == "failed" and "stopped" in run.reason, run.reason
    assert store.lock_holder("consolidation") is None and store.list_adapters() == []
    assert store.count_examples(status="pending") + store.count_examples(status="holdout") == 12
    store.close()


def test_no_train_serves_without_a_scheduler(config, tiny_model_dir, monkeypatch, capsys):
    import agent.server

    started: list[object] = []

    def fake_serve(agent, host, port):  # what cmd_serve built, without binding a port
        started.append(agent.scheduler and agent.scheduler.status())
        agent.close()

    monkeypatch.setattr(agent.server, "serve", fake_serve)
    base = ["--db", config.db, "--model", config.model, "serve"]
    assert cli([*base, "--no-train"]) == 0
    assert cli(base) == 0
    assert started[0] is None
    assert started[1]["enabled"] and started[1]["process"] == "child"
    assert set(started[1]["next_runs"]) == {"interval", "pending"}  # both triggers, on by default
    err = capsys.readouterr().err
    assert "consolidation scheduler off (serving only" in err
    assert "at 16 pending per scope / every 60.0 min, in a child process" in err


def test_a_child_that_ignores_sigterm_is_killed_once(tiny_agent, monkeypatch, caplog):
    """Shutdown sends the consolidation child SIGTERM; one that does not stop in time is killed, with one
    warning, and its exit status is returned."""
    import agent.scheduler as scheduling

    monkeypatch.setattr(scheduling, "CHILD_STOP_SECONDS", 0.5)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    scheduler = scheduling.ConsolidationScheduler(tiny_agent)
    scheduler.stop_event.set()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="agent.scheduler"):
        assert scheduler._wait(stubborn) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert [r.getMessage() for r in caplog.records if "killing it" in r.getMessage()] == [
        f"consolidation process {stubborn.pid} did not stop in 0 s: killing it"]
