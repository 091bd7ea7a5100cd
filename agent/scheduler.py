"""Background consolidation with APScheduler 3.

Two triggers (``[scheduler]`` in the config; ``agent serve`` starts them unless ``--no-train``, an embedded
``Agent`` only when asked with :meth:`agent.Agent.start_scheduler`):
- as soon as ``min_pending`` examples of a scope wait in the buffer (checked every ``check_seconds``); with
  ``consolidation.per_tag`` each task tag is a scope with its own count and its own scoped adapter
  (untagged examples go to the general one);
- every ``interval_minutes``, each scope with enough examples to train on (``consolidation.min_examples``
  after the holdout share), so that a quiet scope learns too.

Where a run happens (``scheduler.process``):
- ``child`` (default): a separate process, ``python -m agent.worker`` (:mod:`agent.worker`), started at a
  lower CPU priority (``scheduler.nice``) with few torch threads (``scheduler.train_threads``), built from
  this process's effective configuration. Serving lends it cores (``scheduler.lend_cores``) and takes them back,
  the child paused, while users are served (``scheduler.pause_for_users``, :mod:`agent.pausing`). Serving keeps
  its interpreter and its cores' priority; the promoted adapter reaches it through the store
  (:meth:`agent.Agent.refresh_adapters`), without a restart. ``shutdown()`` sends the child SIGTERM, which
  stops its training at the next step; a child that does not exit within ``CHILD_STOP_SECONDS`` is killed (a
  consolidation is crash-safe, see :mod:`agent.consolidation`).
- ``thread``: in the scheduler's worker thread of this process, sharing its torch threads with serving.

Runs never overlap: APScheduler's ``max_instances=1`` and a lock inside the process, and the store's
consolidation lock across processes sharing one database (whose holder ``agent schedule status`` and
``/metrics`` show, child processes included).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent.auth import OPERATOR_SOURCES
from agent.config import AgentConfig
from agent.consolidation import ConsolidationReport, Learner, cleanup_after_crash, in_holdout, uncapped_sources
from agent.pausing import PauseLine
from policies.yielding import TrainerTurns
from store.schema import utcnow

logger = logging.getLogger(__name__)


class _OverlapIsExpected(logging.Filter):
    """APScheduler warns every time a check falls due while the previous one still runs. Here that is the design
    (a check that finds work runs the whole consolidation, and runs never overlap), so it is not worth a WARNING
    every ``check_seconds`` of a 15-minute run; the run itself logs its start and end."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


_OVERLAP_FILTER = _OverlapIsExpected()

CHILD_STOP_SECONDS = 30.0
"""After SIGTERM, how long a consolidation child may take to stop at its next training step before it is
killed (a training step takes a few seconds on 2 cores; the gate is not interruptible)."""
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
"""The folder holding this ``agent`` package: put first on the child's path, so it runs this same code."""
_BOOTSTRAP = ("import os, runpy, sys; os.nice(int(sys.argv.pop(1))); "
              "runpy.run_module('agent.worker', run_name='__main__', alter_sys=True)")
"""Lowers the child's priority before anything is imported (importing torch is seconds of CPU), then runs
``agent.worker`` as ``python -m`` would."""


class Consolidator(Learner, Protocol):
    """What the scheduler drives: a :class:`~agent.consolidation.Learner` that can run a consolidation
    and serve its result (:meth:`agent.Agent.consolidate`)."""

    def consolidate(self, *, scope: str | None = None, stop: threading.Event | None = None
                    ) -> ConsolidationReport: ...


def default_train_threads() -> int:
    """Torch threads of a consolidation child by default: half the CPU cores, at least one (the other half
    stays with serving)."""
    return max(1, (os.cpu_count() or 2) // 2)


def worker_command(config_file: str, report_file: str, scope: str | None, nice: int, log_level: str,
                   pause_fd: int | None = None) -> list[str]:
    """The child's command line: ``python -m agent.worker ...`` behind a bootstrap that first renices it."""
    command = [sys.executable, "-c", _BOOTSTRAP, str(max(0, nice)), "--config", config_file,
               "--report", report_file, "--log-level", log_level]
    command += ["--pause-fd", str(pause_fd)] if pause_fd is not None else []
    return command + (["--scope", scope] if scope is not None else [])


def child_config_data(config: AgentConfig) -> dict[str, Any]:
    """The effective configuration a consolidation child process is given, as JSON data: the database and
    adapters folder resolved, and no secret (the child serves nothing): instead of the API keys it gets the
    names of the keys its per-source caps must spare."""
    data = config.to_dict()
    data["server"]["admin_token"] = None
    data["consolidation"]["uncapped_sources"] = sorted(
        name for name in uncapped_sources(config) if name and name not in OPERATOR_SOURCES)
    data["server"].update(api_key=None, api_keys={}, api_keys_file=None)
    data["db"], data["adapters_dir"] = config.db_url(), str(config.adapters_path())
    return data


@dataclass
class Pending:
    """A scope's pending examples, as the triggers count them."""

    pending: int = 0
    trainable: int = 0
    """Not in the seeded holdout share: what a run would train on."""
    since_rejected: int = 0
    """Stored after the start of the scope's last run when that run was rejected (all of them otherwise)."""
    cooling: bool = False
    """The scope's last run ended less than ``scheduler.cooldown_minutes`` ago."""


class ConsolidationScheduler:
    def __init__(self, agent: Consolidator) -> None:
        self.agent = agent
        self.config = agent.config.scheduler
        self.stop_event = threading.Event()
        self.last_report: ConsolidationReport | None = None
        self.running = False
        self.child: subprocess.Popen | None = None
        """The consolidation process running now (``process = "child"``), else None."""
        self._run_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)

    @property
    def enabled(self) -> bool:
        return bool(self.config.interval_minutes or self.config.min_pending)

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran: its triggers are on (:meth:`run_now` works either way)."""
        return self._scheduler.running

    def start(self) -> None:
        crashed = cleanup_after_crash(self.agent)
        if crashed:
            logger.warning("marked killed consolidation runs as crashed: %s", crashed)
        if self.config.interval_minutes:
            self._scheduler.add_job(
                self._on_interval, IntervalTrigger(minutes=self.config.interval_minutes), id="interval",
                max_instances=1, coalesce=True,
            )
        if self.config.min_pending:
            self._scheduler.add_job(
                self._check_pending, IntervalTrigger(seconds=self.config.check_seconds), id="pending",
                max_instances=1, coalesce=True,
            )
        logging.getLogger("apscheduler.scheduler").addFilter(_OVERLAP_FILTER)  # one object: added once
        self._scheduler.start()
        logger.info("consolidation scheduler started: interval=%s min, pending>=%s, in a %s",
                    self.config.interval_minutes, self.config.min_pending, self.config.process)

    def shutdown(self) -> None:
        """Ask a running consolidation to stop at its next training step, then stop the scheduler."""
        self.stop_event.set()  # a child process gets SIGTERM from _wait within 0.2 s
        if self._scheduler.running:  # Agent.close() shuts down again after an explicit shutdown()
            self._scheduler.shutdown(wait=True)
        with self._run_lock:  # also wait for a run started with run_now() outside the scheduler's threads
            pass

    def run_now(self, trigger: str = "manual", scope: str | None = None) -> ConsolidationReport | None:
        """Consolidate ``scope`` now unless a run is already going in this process (then None)."""
        if self.stop_event.is_set() or not self._run_lock.acquire(blocking=False):
            return None
        self.running = True
        try:
            logger.info("consolidation triggered (%s)", trigger)
            if self.config.process == "child":
                report = self._run_child(scope)
            else:
                report = self.agent.consolidate(stop=self.stop_event, scope=scope)
            self.last_report = report
            logger.info("consolidation %s: %s", report.status, report.reason)
            return report
        except Exception:  # noqa: BLE001 - a failed run is recorded in the store; the scheduler goes on
            logger.exception("scheduled consolidation failed")
            return None
        finally:
            self.running = False
            self._run_lock.release()

    # --- the child process -------------------------------------------------------------------------
    def _run_child(self, scope: str | None) -> ConsolidationReport:
        """One consolidation in a child process; returns its report once it has exited."""
        with tempfile.TemporaryDirectory(prefix="s2agent-consolidation-") as folder:
            config_file, report_file = os.path.join(folder, "config.json"), os.path.join(folder, "report.json")
            data = child_config_data(self.agent.config)
            with open(config_file, "w") as f:
                json.dump(data, f)
            threads = self.config.train_threads or default_train_threads()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning on a core
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            started = time.perf_counter()
            with self._cores_lent(threads) as pauses:
                command = worker_command(config_file, report_file, scope, self.config.nice, str(level),
                                         pauses.read_fd if pauses else None)
                self.child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                              pass_fds=(pauses.read_fd,) if pauses else ())
                if pauses:
                    pauses.child_started()
                logger.info("consolidation running in process %s (scope %s)", self.child.pid, scope or "general")
                try:
                    code = self._wait(self.child)
                finally:
                    self.child = None
            report = _read_report(report_file)
        if report is None:
            crashed = cleanup_after_crash(self.agent)  # its run row and folders, if it died mid-run
            report = ConsolidationReport("failed", f"the consolidation process exited with status {code} "
                                         f"without a report" + (f" (run {crashed} marked crashed)" if crashed else ""),
                                         scope=scope, seconds=round(time.perf_counter() - started, 2))
        self.agent.refresh_adapters(force=True)  # serve a promotion now, not at the next poll
        return report

    @contextmanager
    def _cores_lent(self, child_threads: int) -> Iterator[PauseLine | None]:
        """While the child runs, serving computes on the cores it leaves (``scheduler.lend_cores``), and, with
        ``scheduler.pause_for_users``, takes them all back while users are served, the child paused through the
        :class:`~agent.pausing.PauseLine` given (None: no pauses). Only the CPU engine has threads to lend
        (:meth:`agent.backends.batching.BatchingBackend.lend_cores`)."""
        lend = getattr(self.agent.backend, "lend_cores", None)
        if not self.config.lend_cores or lend is None:
            yield None
            return
        cores = os.cpu_count() or 1
        threads = max(1, min(self.agent.config.threads or cores, cores - child_threads))
        wait = self.config.pause_for_users
        pauses = PauseLine() if wait else None
        lend(threads, pauses, TrainerTurns(wait) if pauses else None)
        try:
            yield pauses
        finally:
            lend(None)
            if pauses:
                pauses.close()

    def _wait(self, child: subprocess.Popen) -> int:
        """Wait for ``child``; once shutdown has begun, SIGTERM it and kill it after ``CHILD_STOP_SECONDS``."""
        stopping_since: float | None = None
        while True:
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if self.stop_event.is_set():
                if stopping_since is None:
                    stopping_since = time.monotonic()
                    child.send_signal(signal.SIGTERM)
                elif time.monotonic() - stopping_since > CHILD_STOP_SECONDS:
                    logger.warning("consolidation process %s did not stop in %.0f s: killing it",
                                   child.pid, CHILD_STOP_SECONDS)
                    child.kill()
                    return child.wait()  # not the next 0.2 s turn, which logged and killed again until it was gone

    # --- triggers ----------------------------------------------------------------------------------
    def _scopes_pending(self) -> dict[str | None, Pending]:
        """What waits in each scope (each tag with ``consolidation.per_tag``, else None for all); pinned scopes
        are left out."""
        cfg = self.agent.config.consolidation
        store = self.agent.store
        pinned = store.pinned_scopes() if cfg.per_tag else set()  # `agent scopes pin` froze them
        last_runs = store.last_runs_by_scope()
        rejected = {scope: run.started_at for scope, run in last_runs.items() if run.status == "rejected"}
        cooled = utcnow() - timedelta(minutes=self.config.cooldown_minutes)
        cooling = {scope for scope, run in last_runs.items() if run.finished_at and run.finished_at > cooled}
        counts: dict[str | None, Pending] = {}
        for e in store.list_examples(status="pending"):
            scope = e.tag if cfg.per_tag else None
            if scope in pinned:
                continue
            count = counts.setdefault(scope, Pending(cooling=scope in cooling))
            count.pending += 1
            count.trainable += not in_holdout(e.input, cfg)
            count.since_rejected += scope not in rejected or e.created_at > rejected[scope]
        return dict(sorted(counts.items(), key=lambda item: item[0] or ""))

    def _check_pending(self) -> None:
        """Consolidate each scope with ``min_pending`` examples pending, once enough of them would train (a run
        on fewer than ``consolidation.min_examples`` would only start a process to skip), and, when the scope's
        last run was rejected, once ``min_pending`` of them are new since (its examples stay pending, and the
        same data would train the same rejected candidate every ``check_seconds``); never within
        ``cooldown_minutes`` of the end of the scope's last run."""
        needed, least = self.config.min_pending or 0, self.agent.config.consolidation.min_examples
        for scope, count in self._scopes_pending().items():
            due = (count.pending >= needed and count.trainable >= least and count.since_rejected >= needed
                   and not count.cooling)
            if due and not self.stop_event.is_set():
                self.run_now(trigger=f"{count.pending} pending examples" + (f" tagged {scope}" if scope else ""),
                             scope=scope)

    def _on_interval(self) -> None:
        """Consolidate every scope that has enough examples to train on (a run would skip the others)."""
        least = self.agent.config.consolidation.min_examples
        for scope, count in self._scopes_pending().items():
            if count.trainable >= least and not self.stop_event.is_set():
                self.run_now(trigger=f"interval ({count.trainable} examples to train on)", scope=scope)

    def status(self) -> dict[str, Any]:
        jobs = {job.id: job.next_run_time.isoformat() if job.next_run_time else None
                for job in self._scheduler.get_jobs()}
        last = self.last_report
        child = self.child
        return {
            "enabled": self.enabled,
            "process": self.config.process,
            "running": self.running,
            "child_pid": child.pid if child is not None else None,
            "next_runs": jobs,
            "last": last.to_dict() if last else None,
        }


def _read_report(path: str) -> ConsolidationReport | None:
    try:
        with open(path) as f:
            return ConsolidationReport(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
