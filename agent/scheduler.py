"""Background consolidation with APScheduler 3.

Two optional triggers, both off unless configured (``[scheduler]`` in the config):
- every ``interval_minutes``;
- as soon as ``min_pending`` examples wait in the buffer (checked every ``check_seconds``); with
  ``consolidation.per_tag``, each task tag with ``min_pending`` waiting examples gets its own run,
  into its own scoped adapter (untagged examples into the general one).

Runs never overlap: APScheduler's ``max_instances=1`` inside the process, and the store's
consolidation lock across processes sharing one database. Training runs in the scheduler's worker
thread, off the request path; serving continues (slower on 2 cores, never blocked).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import timezone
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent.consolidation import ConsolidationReport, Learner, cleanup_after_crash

logger = logging.getLogger(__name__)


class Consolidator(Learner, Protocol):
    """What the scheduler drives: a :class:`~agent.consolidation.Learner` that can run a consolidation
    and serve its result (:meth:`agent.Agent.consolidate`)."""

    def consolidate(self, *, scope: str | None = None, stop: threading.Event | None = None
                    ) -> ConsolidationReport: ...


class ConsolidationScheduler:
    def __init__(self, agent: Consolidator) -> None:
        self.agent = agent
        self.config = agent.config.scheduler
        self.stop_event = threading.Event()
        self.last_report: ConsolidationReport | None = None
        self.running = False
        self._run_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)

    @property
    def enabled(self) -> bool:
        return bool(self.config.interval_minutes or self.config.min_pending)

    def start(self) -> None:
        crashed = cleanup_after_crash(self.agent)
        if crashed:
            logger.warning("marked killed consolidation runs as crashed: %s", crashed)
        if self.config.interval_minutes:
            self._scheduler.add_job(
                self.run_now, IntervalTrigger(minutes=self.config.interval_minutes), id="interval",
                kwargs={"trigger": "interval"}, max_instances=1, coalesce=True,
            )
        if self.config.min_pending:
            self._scheduler.add_job(
                self._check_pending, IntervalTrigger(seconds=self.config.check_seconds), id="pending",
                max_instances=1, coalesce=True,
            )
        self._scheduler.start()
        logger.info("consolidation scheduler started: interval=%s min, pending>=%s",
                    self.config.interval_minutes, self.config.min_pending)

    def shutdown(self) -> None:
        """Ask a running consolidation to stop at its next training step, then stop the scheduler."""
        self.stop_event.set()
        if self._scheduler.running:  # Agent.close() shuts down again after an explicit shutdown()
            self._scheduler.shutdown(wait=True)
        with self._run_lock:  # also wait for a run started with run_now() outside the scheduler's threads
            pass

    def run_now(self, trigger: str = "manual", scope: str | None = None) -> ConsolidationReport | None:
        """Consolidate ``scope`` now unless a run is already going in this process (then None)."""
        if not self._run_lock.acquire(blocking=False):
            return None
        self.running = True
        try:
            logger.info("consolidation triggered (%s)", trigger)
            report = self.agent.consolidate(stop=self.stop_event, scope=scope)
            self.last_report = report
            return report
        except Exception:  # noqa: BLE001 - a failed run is recorded in the store; the scheduler goes on
            logger.exception("scheduled consolidation failed")
            return None
        finally:
            self.running = False
            self._run_lock.release()

    def _check_pending(self) -> None:
        needed = self.config.min_pending or 0
        if not self.agent.config.consolidation.per_tag:
            pending = self.agent.store.count_examples(status="pending")
            if pending >= needed:
                self.run_now(trigger=f"{pending} pending examples")
            return
        by_tag = Counter(e.tag for e in self.agent.store.list_examples(status="pending"))
        for tag, pending in sorted(by_tag.items(), key=lambda item: item[0] or ""):
            if pending >= needed and not self.stop_event.is_set():
                self.run_now(trigger=f"{pending} pending examples tagged {tag or '(none)'}", scope=tag)

    def status(self) -> dict[str, Any]:
        jobs = {job.id: job.next_run_time.isoformat() if job.next_run_time else None
                for job in self._scheduler.get_jobs()}
        last = self.last_report
        return {
            "enabled": self.enabled,
            "running": self.running,
            "next_runs": jobs,
            "last": last.to_dict() if last else None,
        }
